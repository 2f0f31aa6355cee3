using System.Buffers.Binary;
using System.Net;

namespace Veil.Tests;

/// <summary>Crafted TUN reads with a virtio header: TSO super-packets split, partial checksums finished.</summary>
public class SegmenterTests
{
    internal static byte[] Tcp(bool v6, int payloadLen, byte flags, int optionsLen = 0)
    {
        int ip = v6 ? 40 : 20, tcp = 20 + optionsLen;
        byte[] p = new byte[ip + tcp + payloadLen];
        if (v6)
        {
            p[0] = 0x60;
            BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(4), (ushort)(tcp + payloadLen));
            p[6] = 6; p[7] = 64;
            IPAddress.Parse("fd00:64::1").GetAddressBytes().CopyTo(p, 8);
            IPAddress.Parse("fd00:64::2").GetAddressBytes().CopyTo(p, 24);
        }
        else
        {
            p[0] = 0x45;
            BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(2), (ushort)p.Length);
            BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(4), 0x1234);
            p[8] = 64; p[9] = 6;
            IPAddress.Parse("100.64.0.1").GetAddressBytes().CopyTo(p, 12);
            IPAddress.Parse("100.64.0.2").GetAddressBytes().CopyTo(p, 16);
        }
        Span<byte> t = p.AsSpan(ip);
        BinaryPrimitives.WriteUInt16BigEndian(t, 40000);
        BinaryPrimitives.WriteUInt16BigEndian(t[2..], 5201);
        BinaryPrimitives.WriteUInt32BigEndian(t[4..], 1_000_000);
        BinaryPrimitives.WriteUInt32BigEndian(t[8..], 77);
        t[12] = (byte)((tcp / 4) << 4);
        t[13] = flags;
        for (int i = 0; i < optionsLen; i++) t[20 + i] = 1;        // NOPs
        for (int i = 0; i < payloadLen; i++) p[ip + tcp + i] = (byte)(i * 7);
        return p;
    }

    internal static byte[] Read(byte[] packet, byte flags, byte gso, int gsoSize, int csumStart, int csumOffset)
    {
        byte[] r = new byte[Segmenter.VirtioHdrLen + packet.Length];
        r[0] = flags; r[1] = gso;
        BinaryPrimitives.WriteUInt16LittleEndian(r.AsSpan(4), (ushort)gsoSize);
        BinaryPrimitives.WriteUInt16LittleEndian(r.AsSpan(6), (ushort)csumStart);
        BinaryPrimitives.WriteUInt16LittleEndian(r.AsSpan(8), (ushort)csumOffset);
        packet.CopyTo(r, Segmenter.VirtioHdrLen);
        return r;
    }

    // A valid checksum sums to 0xFFFF over the covered bytes (with the pseudo-header for L4).
    private static bool L4ChecksumOk(byte[] p, bool v6)
    {
        int ip = v6 ? 40 : (p[0] & 0xF) * 4;
        ulong sum = Checksum.Add(0, p.AsSpan(ip));
        sum = Checksum.Add(Checksum.Add(sum, p.AsSpan(v6 ? 8 : 12, v6 ? 32 : 8)), (uint)(p.Length - ip)) + p[v6 ? 6 : 9];
        return Checksum.Fold(sum) == 0xFFFF;
    }

    private static List<byte[]> All(Segmenter s)
    {
        var list = new List<byte[]>();
        byte[] buf = new byte[9000];
        for (int n; (n = s.Next(buf)) > 0;) list.Add(buf[..n]);
        return list;
    }

    [Theory]
    [InlineData(false, 5000, 1400, 0)]
    [InlineData(true, 5000, 1380, 12)]
    [InlineData(false, 1400, 1400, 0)]
    [InlineData(false, 64000, 1368, 12)]
    public void TsoSuperPacket_SplitIntoValidSegments(bool v6, int payload, int mss, int options)
    {
        byte[] super = Tcp(v6, payload, 0x18 | 0x01 | 0x80, options);      // PSH|ACK|FIN|CWR
        int l4 = v6 ? 40 : 20;
        var s = new Segmenter();
        Assert.True(s.Start(Read(super, 1, v6 ? (byte)4 : (byte)1, mss, l4, 16)));
        List<byte[]> segs = All(s);
        int expect = (payload + mss - 1) / mss;
        Assert.Equal(expect, segs.Count);
        int hdr = l4 + 20 + options, seen = 0;
        for (int i = 0; i < segs.Count; i++)
        {
            byte[] g = segs[i];
            int len = Math.Min(mss, payload - i * mss);
            Assert.Equal(hdr + len, g.Length);
            if (v6) Assert.Equal(g.Length - 40, BinaryPrimitives.ReadUInt16BigEndian(g.AsSpan(4)));
            else
            {
                Assert.Equal(g.Length, BinaryPrimitives.ReadUInt16BigEndian(g.AsSpan(2)));
                Assert.Equal(0x1234 + i, BinaryPrimitives.ReadUInt16BigEndian(g.AsSpan(4)));
                Assert.Equal(0xFFFF, Checksum.Fold(Checksum.Add(0, g.AsSpan(0, 20))));
            }
            Assert.Equal(1_000_000u + (uint)(i * mss), BinaryPrimitives.ReadUInt32BigEndian(g.AsSpan(l4 + 4)));
            byte flags = g[l4 + 13];
            Assert.Equal(i == segs.Count - 1, (flags & 0x09) == 0x09);    // FIN|PSH only last
            Assert.Equal(i == 0, (flags & 0x80) != 0);                    // CWR only first
            Assert.True(L4ChecksumOk(g, v6), $"segment {i}: bad TCP checksum");
            Assert.Equal(super.AsSpan(hdr + seen, len).ToArray(), g.AsSpan(hdr, len).ToArray());
            seen += len;
        }
        Assert.Equal(payload, seen);
    }

    // A TAP frame around an IP packet: destination, source, an optional 802.1Q tag, the type.
    internal static byte[] Frame(byte[] ip, bool vlan = false)
    {
        int link = vlan ? 18 : 14;
        byte[] f = new byte[link + ip.Length];
        for (int i = 0; i < 6; i++) { f[i] = (byte)(0x02 + i); f[6 + i] = (byte)(0x12 + i); }
        if (vlan) { f[12] = 0x81; f[13] = 0x00; f[14] = 0x00; f[15] = 42; }
        BinaryPrimitives.WriteUInt16BigEndian(f.AsSpan(link - 2), (ushort)((ip[0] >> 4) == 6 ? 0x86DD : 0x0800));
        ip.CopyTo(f, link);
        return f;
    }

    // The same super-packet read from a TAP (offsets in the virtio header count from the frame's
    // start): every segment is the frame's Ethernet header, tag included, and the TUN's segment.
    [Theory]
    [InlineData(false, false)]
    [InlineData(true, false)]
    [InlineData(false, true)]
    public void TapSuperFrame_EachSegmentKeepsTheEthernetHeader(bool v6, bool vlan)
    {
        byte[] super = Tcp(v6, 9000, 0x18, 12);
        int ip = v6 ? 40 : 20, link = vlan ? 18 : 14;
        var tun = new Segmenter();
        Assert.True(tun.Start(Read(super, 1, v6 ? (byte)4 : (byte)1, 1400, ip, 16)));
        List<byte[]> plain = All(tun);
        byte[] frame = Frame(super, vlan);
        var tap = new Segmenter { Tap = true };
        Assert.True(tap.Start(Read(frame, 1, v6 ? (byte)4 : (byte)1, 1400, link + ip, 16)));
        List<byte[]> frames = All(tap);
        Assert.Equal(plain.Count, frames.Count);
        for (int i = 0; i < frames.Count; i++)
        {
            Assert.Equal(frame.AsSpan(0, link).ToArray(), frames[i].AsSpan(0, link).ToArray());
            Assert.Equal(plain[i], frames[i][link..]);
        }
        // A GSO frame that carries no IP (or whose L4 start falls inside the Ethernet header) is dropped.
        byte[] arp = (byte[])frame.Clone();
        arp[link - 2] = 0x08; arp[link - 1] = 0x06;
        Assert.False(new Segmenter { Tap = true }.Start(Read(arp, 1, 1, 1400, link + ip, 16)));
        Assert.False(new Segmenter { Tap = true }.Start(Read(frame, 1, v6 ? (byte)4 : (byte)1, 1400, 4, 16)));
    }

    internal static byte[] Udp(bool v6, int payloadLen)
    {
        int ip = v6 ? 40 : 20;
        byte[] p = Tcp(v6, 0, 0);                                         // the IP header, addresses and ports
        Array.Resize(ref p, ip + 8 + payloadLen);
        if (v6) { p[6] = 17; BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(4), (ushort)(8 + payloadLen)); }
        else { p[9] = 17; BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(2), (ushort)p.Length); }
        BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(ip + 4), (ushort)(8 + payloadLen));   // as the sender wrote it: the whole super-datagram
        p.AsSpan(ip + 6, 2).Fill(0xAB);                                   // what the kernel leaves there is not ours to trust
        for (int i = 0; i < payloadLen; i++) p[ip + 8 + i] = (byte)(i * 13 + 5);
        return p;
    }

    [Theory]
    [InlineData(false, 3000, 1200)]
    [InlineData(true, 3000, 1200)]
    [InlineData(false, 2400, 1200)]
    [InlineData(true, 63000, 1432)]
    [InlineData(false, 700, 1200)]
    public void UsoSuperPacket_SplitIntoValidDatagrams(bool v6, int payload, int gsoSize)
    {
        byte[] super = Udp(v6, payload);
        int l4 = v6 ? 40 : 20, hdr = l4 + 8;
        var s = new Segmenter();
        Assert.True(s.Start(Read(super, 1, 5, gsoSize, l4, 6)));            // NEEDS_CSUM, GSO UDP_L4
        List<byte[]> segs = All(s);
        Assert.Equal((payload + gsoSize - 1) / gsoSize, segs.Count);
        int seen = 0;
        for (int i = 0; i < segs.Count; i++)
        {
            byte[] g = segs[i];
            int len = Math.Min(gsoSize, payload - i * gsoSize);
            Assert.Equal(hdr + len, g.Length);
            Assert.Equal(8 + len, BinaryPrimitives.ReadUInt16BigEndian(g.AsSpan(l4 + 4)));
            if (v6) Assert.Equal(8 + len, BinaryPrimitives.ReadUInt16BigEndian(g.AsSpan(4)));
            else
            {
                Assert.Equal(g.Length, BinaryPrimitives.ReadUInt16BigEndian(g.AsSpan(2)));
                Assert.Equal(0x1234 + i, BinaryPrimitives.ReadUInt16BigEndian(g.AsSpan(4)));
                Assert.Equal(0xFFFF, Checksum.Fold(Checksum.Add(0, g.AsSpan(0, 20))));
            }
            Assert.Equal(super.AsSpan(l4, 4).ToArray(), g.AsSpan(l4, 4).ToArray());   // ports
            Assert.NotEqual(0, BinaryPrimitives.ReadUInt16BigEndian(g.AsSpan(l4 + 6)));
            Assert.True(L4ChecksumOk(g, v6), $"datagram {i}: bad UDP checksum");
            Assert.Equal(super.AsSpan(hdr + seen, len).ToArray(), g.AsSpan(hdr, len).ToArray());
            seen += len;
        }
        Assert.Equal(payload, seen);
    }

    [Fact]
    public void UsoSuperPacket_Malformed_Dropped()
    {
        var s = new Segmenter();
        byte[] v4 = Udp(false, 3000);
        Assert.False(s.Start(Read(v4, 1, 5, 0, 20, 6)));                      // gso size 0
        Assert.False(s.Start(Read(v4, 1, 5, 1200, 3025, 6)));                // UDP header past the end
        Assert.False(s.Start(Read(v4, 1, 5, 1200, 12, 6)));                  // UDP inside the IPv4 header
        Assert.False(s.Start(Read(v4[..26], 1, 5, 1200, 20, 6)));            // UDP header cut off
        byte[] v5 = Udp(false, 3000);
        v5[0] = 0x55;                                                         // neither IPv4 nor IPv6
        Assert.False(s.Start(Read(v5, 1, 5, 1200, 20, 6)));
        Assert.False(s.Start(Read(Udp(true, 3000), 1, 5, 1200, 20, 6)));     // inside the IPv6 header
        Assert.Equal(6, s.Malformed);
        Assert.True(s.Start(Read(v4, 1, 5, 1200, 20, 6)));
        Assert.Equal(0, s.Next(new byte[100]));                               // a slot too small: counted, not written
        Assert.Equal(7, s.Malformed);
    }

    [Fact]
    public void WholePacket_PartialChecksumFinished()
    {
        byte[] p = Tcp(false, 300, 0x18);
        // what the kernel leaves: the pseudo-header sum in the checksum field
        ulong pseudo = Checksum.Add(Checksum.Add(0, p.AsSpan(12, 8)), (uint)(p.Length - 20)) + 6;
        BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(36), Checksum.Fold(pseudo));
        var s = new Segmenter();
        Assert.True(s.Start(Read(p, 1, 0, 0, 20, 16)));
        byte[] got = Assert.Single(All(s));
        Assert.True(L4ChecksumOk(got, false));
    }

    [Fact]
    public void WholePacket_NoFlags_UnchangedCopy()
    {
        byte[] p = Packets.Udp4("100.64.0.1", "100.64.0.2", 100);
        var s = new Segmenter();
        Assert.True(s.Start(Read(p, 0, 0, 0, 0, 0)));
        Assert.Equal(p, Assert.Single(All(s)));
    }

    [Fact]
    public void Malformed_Dropped_NeverThrows()
    {
        var s = new Segmenter();
        Assert.False(s.Start(new byte[5]));
        byte[] super = Tcp(false, 3000, 0x10);
        Assert.False(s.Start(Read(super, 1, 1, 0, 20, 16)));                  // gso size 0
        Assert.False(s.Start(Read(super, 1, 1, 1400, 9000, 16)));             // csum start past the end
        Assert.False(s.Start(Read(super, 1, 4, 1400, 20, 16)));               // v6 GSO on a v4 packet
        Assert.False(s.Start(Read(super, 1, 3, 1400, 20, 16)));               // unknown GSO type
        Assert.False(s.Start(Read(Tcp(false, 10, 0x10)[..30], 1, 1, 1400, 20, 16)));   // TCP header cut off
        byte[] longIhl = Tcp(false, 3000, 0x10);
        longIhl[0] = 0x4F;                                                    // IPv4 header claims 60 bytes
        Assert.False(s.Start(Read(longIhl, 1, 1, 1400, 20, 16)));
        byte[] shortTcp = Tcp(false, 3000, 0x10);
        shortTcp[32] = 0x40;                                                  // TCP data offset 16 bytes (< 20)
        Assert.False(s.Start(Read(shortTcp, 1, 1, 1400, 20, 16)));
        var rng = new Random(9);
        for (int i = 0; i < 5000; i++)
        {
            byte[] r = new byte[rng.Next(0, 200)];
            rng.NextBytes(r);
            if (s.Start(r)) All(s);
        }
        Assert.True(s.Malformed >= 8);
    }
}
