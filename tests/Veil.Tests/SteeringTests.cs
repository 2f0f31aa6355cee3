using System.Buffers.Binary;

namespace Veil.Tests;

/// <summary>§13 the classic BPF program that steers handshake datagrams to a socket of their own
/// (SO_ATTACH_REUSEPORT_CBPF), run here by a small interpreter of the instructions it may use, on
/// the packets the kernel would show it: the UDP payload at offset 0, the IP header at SKF_NET_OFF.</summary>
public class SteeringTests
{
    private const int NetOff = -0x100000;                     // SKF_NET_OFF

    /// <summary>Runs prog as the kernel's reuseport hook would; null where the kernel would abort it
    /// (an unknown instruction, a jump out of the program, a load out of the packet: it returns 0).</summary>
    private static uint? Run(SockFilter[] prog, byte[] ip, int payloadOffset)
    {
        uint a = 0, x = 0;
        for (int pc = 0; pc < prog.Length; pc++)
        {
            SockFilter f = prog[pc];
            switch (f.Code)
            {
                case 0x30: case 0x28: case 0x20:                  // ld{b,h,w} [k]
                    int size = f.Code == 0x30 ? 1 : f.Code == 0x28 ? 2 : 4;
                    int k = (int)f.K;
                    int at = k >= NetOff && k < NetOff + 0x10000 ? k - NetOff : payloadOffset + k;
                    if (at < 0 || at + size > ip.Length) return 0;
                    a = size == 1 ? ip[at] : size == 2 ? BinaryPrimitives.ReadUInt16BigEndian(ip.AsSpan(at)) : BinaryPrimitives.ReadUInt32BigEndian(ip.AsSpan(at));
                    break;
                case 0x74: a >>= (int)f.K; break;                 // rsh #k
                case 0x94: if (f.K == 0) return null; a %= f.K; break;   // mod #k
                case 0x0c: a += x; break;                         // add x
                case 0x07: x = a; break;                          // tax
                case 0x15: pc += a == f.K ? f.Jt : f.Jf; break;   // jeq #k
                case 0x05: pc += (int)f.K; break;                 // ja
                case 0x06: return f.K;                            // ret #k
                case 0x16: return a;                              // ret a
                default: return null;
            }
            if (pc + 1 > prog.Length) return null;
        }
        return null;                                          // fell off the end: the kernel refuses such a program
    }

    private static byte[] V4(string src, int sport, byte[] payload) => Packets.Udp4(src, sport, "198.51.100.2", 51820, payload);
    private static byte[] V6(string src, int sport, byte[] payload) => Packets.Udp6(src, sport, "2001:db8::2", 51820, payload);

    private static byte[] Hello() { byte[] h = new byte[Wire.ClientHelloLen]; h[0] = Spec.TlsHandshake; h[1] = 3; h[2] = 3; return h; }
    private static byte[] Transport() { byte[] r = new byte[Record.OverheadLen + 32]; r[0] = Spec.TlsApplicationData; r[1] = 3; r[2] = 3; return r; }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(8)]
    [InlineData(Tune.MaxWorkers)]
    public void Handshakes_GoToTheLastSocket_TransportSpreadsOverTheWorkers(int workers)
    {
        SockFilter[] prog = UdpSocket.HandshakeSteering(workers);
        Assert.InRange(prog.Length, 1, 64);
        var seen = new HashSet<uint>();
        var rng = new Random(workers);
        for (int i = 0; i < 400; i++)
        {
            bool v6 = i % 2 == 1;
            string src = v6 ? $"2001:db8:{rng.Next(1, 0xffff):x}::{rng.Next(1, 0xffff):x}" : $"203.0.{rng.Next(256)}.{rng.Next(1, 255)}";
            int sport = i % 3 == 0 ? 51820 : rng.Next(1024, 65536);
            byte[] hs = v6 ? V6(src, sport, Hello()) : V4(src, sport, Hello());
            byte[] tr = v6 ? V6(src, sport, Transport()) : V4(src, sport, Transport());
            int off = v6 ? 48 : 28;
            Assert.Equal((uint)workers, Run(prog, hs, off));
            uint? to = Run(prog, tr, off);
            Assert.NotNull(to);
            Assert.InRange(to!.Value, 0u, (uint)workers - 1);
            Assert.Equal(to, Run(prog, tr, off));             // one flow, one worker: its records stay in order
            seen.Add(to.Value);
            // junk and an empty payload stay with the workers too (they drop it, counted)
            byte[] empty = v6 ? V6(src, sport, []) : V4(src, sport, []);
            Assert.InRange(Run(prog, empty, off) ?? 99u, 0u, (uint)workers - 1);
        }
        Assert.Equal(workers, seen.Count);                     // every worker gets flows
    }

    [Fact]
    public void ApeerOnTheDefaultPort_FlowsOfDifferentPeersStillSpread()
    {
        SockFilter[] prog = UdpSocket.HandshakeSteering(4);
        var seen = new HashSet<uint?>();
        for (int h = 1; h <= 32; h++) seen.Add(Run(prog, V4($"192.0.2.{h}", 51820, Transport()), 28));
        Assert.Equal(4, seen.Count);
    }
}
