using System.Buffers.Binary;
using System.Net;

namespace Veil.Tests;

/// <summary>In-process nodes on the loopback dataplane and an in-memory UDP network, with a test clock.</summary>
internal sealed class TestNode
{
    internal readonly Key32 Private;
    internal readonly Key32 Public;
    internal readonly Endpoint Endpoint;
    internal readonly Node Node;
    internal readonly LoopbackDataplane Tun = new();
    internal readonly LoopbackUdp Udp;
    internal readonly Worker Worker;
    internal readonly Log Log;
    internal readonly StringWriter LogText = new();
    internal readonly string Overlay;     // e.g. 100.64.0.1

    internal TestNode(LoopbackNet net, Key32 priv, UpConfig cfg, Endpoint self, string overlay, long unixNs)
    {
        Private = priv;
        X25519.PublicKey(Public, priv);
        Endpoint = self;
        Overlay = overlay;
        Log = new Log(LogText, LogLevel.Debug);
        Node = new Node(cfg, Log, new Counters());
        long t = unixNs;
        Node.UnixNs = () => t += 1_000_000;
        Udp = new LoopbackUdp(net, self);
        Worker = new Worker(Node, Tun, Udp);
    }

    internal static Key32 KeyFromSeed(byte seed)
    {
        Key32 k = default;
        for (int i = 0; i < 32; i++) k[i] = (byte)(seed * 31 + i);
        k[0] &= 248; k[31] &= 127; k[31] |= 64;
        return k;
    }
}

internal sealed class TestNet
{
    internal readonly LoopbackNet Net = new();
    internal long NowMs = 1_000_000;
    internal readonly List<TestNode> Nodes = new();

    /// <summary>n nodes, each with overlay 100.64.0.(i+1) and every other node as a peer allowed its /32.</summary>
    internal static TestNet FullMesh(int n, Action<UpConfig>? tweak = null, byte seedBase = 1)
    {
        var t = new TestNet();
        var keys = new Key32[n];
        var pubs = new Key32[n];
        for (int i = 0; i < n; i++) { keys[i] = TestNode.KeyFromSeed((byte)(seedBase + i)); X25519.PublicKey(pubs[i], keys[i]); }
        for (int i = 0; i < n; i++)
        {
            var cfg = new UpConfig { PrivateKey = keys[i], Mtu = 1420 };
            for (int j = 0; j < n; j++)
            {
                if (j == i) continue;
                var pc = new PeerConfig { PublicKey = pubs[j], Endpoint = Ep(j) };
                pc.Allowed.Add(IpPrefix.Parse($"100.64.0.{j + 1}/32"));
                pc.Allowed.Add(IpPrefix.Parse($"fd00:64::{j + 1}/128"));
                cfg.Peers.Add(pc);
            }
            tweak?.Invoke(cfg);
            t.Nodes.Add(new TestNode(t.Net, keys[i], cfg, Ep(i), $"100.64.0.{i + 1}", 1_700_000_000_000_000_000L));
        }
        return t;
    }

    internal static Key32 MeshPsk(byte fill = 0xA5)
    {
        Key32 k = default;
        for (int i = 0; i < 32; i++) k[i] = (byte)(fill + i);
        return k;
    }

    internal static Key32 PublicOf(in Key32 priv)
    {
        Key32 pub = default;
        X25519.PublicKey(pub, priv);
        return pub;
    }

    /// <summary>The config node i of a mesh gets: overlay 100.64.0.(i+1)/24 and fd00:64::(i+1)/64 (the
    /// networks), --mesh with the shared psk, keepalive 10 s, name "n{i}", and every node of knows(i) as
    /// a --peer with its endpoint and no --allow.</summary>
    internal static UpConfig MeshConfig(int i, Key32[] keys, IEnumerable<int> knows, bool mesh = true)
    {
        var cfg = new UpConfig
        {
            PrivateKey = keys[i], PublicKey = PublicOf(keys[i]), Mtu = 1420, Mesh = mesh, Psk = MeshPsk(),
            PersistentKeepaliveMs = Tune.MeshKeepaliveMs, Name = $"n{i}",
        };
        cfg.Addresses.Add(new IfAddress(IPAddress.Parse($"100.64.0.{i + 1}"), 24));
        cfg.Addresses.Add(new IfAddress(IPAddress.Parse($"fd00:64::{i + 1:x}"), 64));
        cfg.Networks.Add(IpPrefix.Parse("100.64.0.0/24"));
        cfg.Networks.Add(IpPrefix.Parse("fd00:64::/64"));
        foreach (int j in knows)
            cfg.Peers.Add(new PeerConfig { PublicKey = PublicOf(keys[j]), Endpoint = Ep(j), EndpointText = Ep(j).ToString() });
        return cfg;
    }

    /// <summary>The config that would give node n its active peers as they are now (a reload's starting point).</summary>
    internal static UpConfig ConfigOf(TestNode n)
    {
        var cfg = new UpConfig { PrivateKey = n.Private, Mtu = 1420 };
        foreach (Peer p in n.Node.Peers)
        {
            if (!p.Active) continue;
            var pc = new PeerConfig { PublicKey = p.PublicKey, Endpoint = p.Endpoint, Name = p.Name };
            pc.Allowed.AddRange(p.Allowed);
            cfg.Peers.Add(pc);
        }
        return cfg;
    }

    internal Key32[] Keys = [];

    /// <summary>at's peer for other; a test failure when at has none.</summary>
    internal static Peer PeerOf(TestNode at, TestNode other) =>
        at.Node.FindPeer(other.Public) ?? throw new Xunit.Sdk.XunitException($"{at.Overlay} has no peer for {other.Overlay}");

    /// <summary>n mesh members (see MeshConfig); node i knows the nodes knows(i); tweak edits a config
    /// before its node is made. Each node's Mesh.LocalEndpoints holds its own endpoint, as the daemon's
    /// address scan would.</summary>
    internal static TestNet Mesh(int n, Func<int, IEnumerable<int>> knows, Action<int, UpConfig>? tweak = null, byte seedBase = 1, bool mesh = true)
    {
        var t = new TestNet { Keys = new Key32[n] };
        for (int i = 0; i < n; i++) t.Keys[i] = TestNode.KeyFromSeed((byte)(seedBase + i));
        for (int i = 0; i < n; i++)
        {
            UpConfig cfg = MeshConfig(i, t.Keys, knows(i), mesh);
            tweak?.Invoke(i, cfg);
            t.AddNode(t.Keys[i], cfg, Ep(i), $"100.64.0.{i + 1}");
        }
        return t;
    }

    /// <summary>A node on this network (not started; call StartNode or Start).</summary>
    internal TestNode AddNode(Key32 priv, UpConfig cfg, Endpoint self, string overlay, long unixNs = 1_700_000_000_000_000_000L)
    {
        var node = new TestNode(Net, priv, cfg, self, overlay, unixNs);
        node.Node.Mesh.LocalEndpoints.Add(self);
        Nodes.Add(node);
        return node;
    }

    /// <summary>Starts one node (its first handshakes go out with the next Pump).</summary>
    internal void StartNode(TestNode n)
    {
        n.Node.Start(NowMs);
        n.Worker.FlushUdp(n.Node.UdpOut);
    }

    /// <summary>Takes a node off the network (as if killed: nothing more is sent or received).</summary>
    internal void Kill(TestNode n)
    {
        Nodes.Remove(n);
        n.Udp.Dispose();
    }

    /// <summary>Advances in steps until cond holds or maxMs passed; returns the simulated ms it took (-1: never).</summary>
    internal long AdvanceUntil(Func<bool> cond, long maxMs, long stepMs = 100)
    {
        long start = NowMs;
        while (!cond())
        {
            if (NowMs - start >= maxMs) return -1;
            Advance(stepMs, stepMs);
        }
        return NowMs - start;
    }

    internal int Drops(int node, DropReason r) => (int)Nodes[node].Node.Counters.Drops[(int)r];

    internal static Endpoint Ep(int i) => Endpoint.FromIp(IPAddress.Parse($"192.0.2.{i + 1}"), 51820);

    /// <summary>Moves packets until nothing is left in flight (bounded), then runs the timers.</summary>
    internal void Pump()
    {
        for (int round = 0; round < 1000; round++)
        {
            bool any = false;
            foreach (TestNode n in Nodes)
            {
                while (n.Tun.Pending > 0) { n.Worker.PumpTun(NowMs); any = true; }
                while (n.Udp.Pending > 0) { n.Worker.PumpUdp(NowMs); any = true; }
            }
            foreach (TestNode n in Nodes) n.Worker.PumpTimers(NowMs);
            if (!any && Nodes.TrueForAll(n => n.Tun.Pending == 0 && n.Udp.Pending == 0)) return;
        }
        throw new InvalidOperationException("network did not settle in 1000 rounds");
    }

    /// <summary>Advances the clock in steps, pumping at each.</summary>
    internal void Advance(long ms, long stepMs = 100)
    {
        for (long done = 0; done < ms; done += stepMs)
        {
            NowMs += Math.Min(stepMs, ms - done);
            DeliverDue();
            Pump();
        }
    }

    // Latency (off unless UseLatency): datagrams wait in flight and arrive with the first Advance step
    // at or after their due time, so one step of at least the latency is one hop.
    private readonly Queue<(long At, Endpoint From, Endpoint To, byte[] Data)> _inFlight = new();

    /// <summary>From now on every datagram arrives ms after it was sent (a test Filter cannot be used with it).</summary>
    internal void UseLatency(long ms)
    {
        Net.Filter = (from, to, d) => { _inFlight.Enqueue((NowMs + ms, from, to, d)); return false; };
    }

    internal int InFlight => _inFlight.Count;

    private void DeliverDue()
    {
        while (_inFlight.Count > 0 && _inFlight.Peek().At <= NowMs)
        {
            var (_, from, to, d) = _inFlight.Dequeue();
            if (Net.Hosts.TryGetValue(to, out LoopbackUdp? dst)) dst.Deliver(d, from);
        }
    }

    internal void Start()
    {
        foreach (TestNode n in Nodes) { n.Node.Start(NowMs); n.Worker.FlushUdp(n.Node.UdpOut); }
        Pump();
    }

    /// <summary>Injects a packet from node a to node b's overlay address; returns how many copies b received.</summary>
    internal int Send(int a, int b, int payloadLen = 64, byte tag = 0)
    {
        TestNode src = Nodes[a], dst = Nodes[b];
        int before = dst.Tun.Written.Count;
        src.Tun.Inject(Packets.Udp4(src.Overlay, dst.Overlay, payloadLen, tag));
        Pump();
        return dst.Tun.Written.Count - before;
    }
}

internal static class Packets
{
    /// <summary>A minimal IPv4/UDP packet (checksums are not checked on this path).</summary>
    internal static byte[] Udp4(string src, string dst, int payloadLen, byte tag = 0)
    {
        byte[] payload = new byte[payloadLen];
        for (int i = 0; i < payloadLen; i++) payload[i] = (byte)(tag + i);
        return Udp4(src, 1234, dst, 5678, payload);
    }

    internal static byte[] Udp4(string src, int srcPort, string dst, int dstPort, byte[] payload)
    {
        byte[] p = new byte[28 + payload.Length];
        p[0] = 0x45;
        BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(2), (ushort)p.Length);
        p[8] = 64;
        p[9] = 17;
        IPAddress.Parse(src).GetAddressBytes().CopyTo(p, 12);
        IPAddress.Parse(dst).GetAddressBytes().CopyTo(p, 16);
        BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(20), (ushort)srcPort);
        BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(22), (ushort)dstPort);
        BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(24), (ushort)(8 + payload.Length));
        payload.CopyTo(p, 28);
        return p;
    }

    internal static byte[] Udp6(string src, string dst, int payloadLen) => Udp6(src, 0, dst, 0, new byte[payloadLen]);

    internal static byte[] Udp6(string src, int srcPort, string dst, int dstPort, byte[] payload)
    {
        byte[] p = new byte[48 + payload.Length];
        p[0] = 0x60;
        BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(4), (ushort)(8 + payload.Length));
        p[6] = 17;
        p[7] = 64;
        IPAddress.Parse(src).GetAddressBytes().CopyTo(p, 8);
        IPAddress.Parse(dst).GetAddressBytes().CopyTo(p, 24);
        BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(40), (ushort)srcPort);
        BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(42), (ushort)dstPort);
        BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(44), (ushort)(8 + payload.Length));
        payload.CopyTo(p, 48);
        return p;
    }
}

internal static class Allocations
{
    /// <summary>Asserts that `round` allocates nothing in steady state: after 20 warm-up calls, three
    /// windows of `rounds` calls each. A window of zero proves nothing is allocated per call (the
    /// calls would show); the bound catches a leak only some windows hit, while the runtime itself
    /// (tiering, other tests' threads) may rarely charge a few bytes once.</summary>
    internal static void AssertNone(Action round, int rounds)
    {
        for (int i = 0; i < 20; i++) round();
        long[] windows = new long[3];
        for (int w = 0; w < windows.Length; w++)
        {
            long before = GC.GetAllocatedBytesForCurrentThread();
            for (int i = 0; i < rounds; i++) round();
            windows[w] = GC.GetAllocatedBytesForCurrentThread() - before;
        }
        Xunit.Assert.True(windows.Min() == 0 && windows.Max() < 64 * 1024, $"allocated per window: {string.Join(", ", windows)}");
    }
}
