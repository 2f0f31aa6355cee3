namespace Veil.Tests;

/// <summary>--filter (PacketFilter): rule syntax, first match, per-direction default, stateful
/// replies, bounded flow table; and on a node: what it drops is counted and never reaches the TUN.</summary>
public sealed class FilterTests
{
    private static byte[] Tcp(string src, int sport, string dst, int dport)
    {
        byte[] p = Packets.Udp4(src, sport, dst, dport, new byte[20]);
        p[Ip.V4ProtocolOffset] = Ip.ProtocolTcp;      // the filter reads ports at the same place
        return p;
    }

    private static byte[] Udp(string src, int sport, string dst, int dport) => Packets.Udp4(src, sport, dst, dport, new byte[8]);

    private static (PacketFilter F, Peer Admin, Peer Guest) Make(params string[] rules)
    {
        var t = TestNet.FullMesh(3);
        Peer admin = TestNet.PeerOf(t.Nodes[0], t.Nodes[1]), guest = TestNet.PeerOf(t.Nodes[0], t.Nodes[2]);
        admin.Name = "admin-bee";
        guest.Name = "guest";
        return (new PacketFilter(rules.Select(PacketFilter.Parse).ToList()), admin, guest);
    }

    [Theory]
    [InlineData("tcp 22", "expected in or out")]
    [InlineData("in", "expected tcp, udp, icmp or any")]
    [InlineData("in sctp", "is not tcp, udp, icmp or any")]
    [InlineData("in tcp 0", "a port is 1-65535")]
    [InlineData("in tcp 90-80", "a port is 1-65535")]
    [InlineData("in icmp 22", "ports go with tcp or udp")]
    [InlineData("in tcp 22 from a/b", "a peer pattern is a name")]
    [InlineData("in tcp 22 from admin extra", "unexpected 'extra'")]
    public void Parse_BadRule_OneClearLine(string rule, string why) =>
        Assert.Contains(why, Assert.Throws<ConfigException>(() => PacketFilter.Parse(rule)).Message);

    [Fact]
    public void Inbound_OnlyWhatARuleAllows_RepliesPass_OutboundUntouched()
    {
        var (f, admin, guest) = Make("in tcp 22 from admin-*", "in icmp");
        long now = 1000;
        Assert.True(f.Allow(Tcp("100.64.0.2", 40000, "100.64.0.1", 22), admin, outbound: false, now));
        Assert.False(f.Allow(Tcp("100.64.0.3", 40000, "100.64.0.1", 22), guest, outbound: false, now));   // not admin-*
        Assert.False(f.Allow(Tcp("100.64.0.2", 40000, "100.64.0.1", 23), admin, outbound: false, now));   // another port
        Assert.Equal(2, f.Refused);
        Assert.Equal(1, f.Rules[0].Hits);
        // our answer on the allowed flow, and our own new connection out (no out rules: allowed) ...
        Assert.True(f.Allow(Tcp("100.64.0.1", 22, "100.64.0.2", 40000), admin, outbound: true, now));
        Assert.True(f.Allow(Udp("100.64.0.1", 5353, "100.64.0.3", 53), guest, outbound: true, now));
        // ... whose reply comes back in although no in rule allows udp 5353
        Assert.True(f.Allow(Udp("100.64.0.3", 53, "100.64.0.1", 5353), guest, outbound: false, now + 1));
        // but not from another port, nor long after (idle)
        Assert.False(f.Allow(Udp("100.64.0.3", 54, "100.64.0.1", 5353), guest, outbound: false, now + 1));
        Assert.False(f.Allow(Udp("100.64.0.3", 53, "100.64.0.1", 5353), guest, outbound: false, now + 200_000));
    }

    // An ICMPv4 error from src to dst quoting the first 28 bytes of packet (its IP header and ports).
    private static byte[] IcmpError(string src, string dst, byte type, byte[] quoted)
    {
        byte[] p = new byte[20 + 8 + 28];
        p[0] = 0x45;
        System.Buffers.Binary.BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(2), (ushort)p.Length);
        p[8] = 64;
        p[Ip.V4ProtocolOffset] = 1;
        System.Net.IPAddress.Parse(src).GetAddressBytes().CopyTo(p, Ip.V4SourceOffset);
        System.Net.IPAddress.Parse(dst).GetAddressBytes().CopyTo(p, Ip.V4DestinationOffset);
        p[20] = type;
        p[21] = type == 3 ? (byte)4 : (byte)0;        // fragmentation needed: what path MTU discovery waits for
        quoted.AsSpan(0, 28).CopyTo(p.AsSpan(28));
        return p;
    }

    [Fact]
    public void IcmpErrors_AboutAKnownFlow_PassWithIt_OthersNeedARule()
    {
        var (f, admin, guest) = Make("in tcp 22", "out tcp 443");
        long now = 1000;
        byte[] outTcp = Tcp("100.64.0.1", 40000, "100.64.0.2", 443);
        Assert.True(f.Allow(outTcp, admin, outbound: true, now));
        // too big / unreachable / time exceeded for our connection: in, though no rule allows icmp
        Assert.True(f.Allow(IcmpError("100.64.0.2", "100.64.0.1", 3, outTcp), admin, outbound: false, now));
        Assert.True(f.Allow(IcmpError("192.168.7.1", "100.64.0.1", 11, outTcp), admin, outbound: false, now));   // from a router on the way
        Assert.False(f.Allow(IcmpError("100.64.0.2", "100.64.0.1", 3, outTcp), guest, outbound: false, now));   // another peer
        Assert.False(f.Allow(IcmpError("100.64.0.2", "100.64.0.1", 3, Tcp("100.64.0.1", 40000, "100.64.0.2", 444)), admin, outbound: false, now));
        Assert.False(f.Allow(IcmpError("100.64.0.2", "100.64.0.1", 8, outTcp), admin, outbound: false, now));   // an echo request is no error
        // and our errors about what a peer sent us on an allowed flow go out
        byte[] inTcp = Tcp("100.64.0.2", 5000, "100.64.0.1", 22);
        Assert.True(f.Allow(inTcp, admin, outbound: false, now));
        Assert.True(f.Allow(IcmpError("100.64.0.1", "100.64.0.2", 3, inTcp), admin, outbound: true, now));
        Assert.False(f.Allow(IcmpError("100.64.0.1", "100.64.0.2", 3, Tcp("100.64.0.2", 5001, "100.64.0.1", 23)), admin, outbound: true, now));
    }

    [Fact]
    public void FirstMatchWins_DenyBeforeAllow()
    {
        var (f, admin, guest) = Make("deny out tcp 25", "allow out any");
        Assert.False(f.Allow(Tcp("100.64.0.1", 40000, "100.64.0.2", 25), admin, outbound: true, 0));
        Assert.True(f.Allow(Tcp("100.64.0.1", 40000, "100.64.0.2", 443), admin, outbound: true, 0));
        Assert.Equal(0, f.Refused);
        Assert.Equal(1, f.Rules[0].Hits);
        Assert.True(f.Allow(Udp("100.64.0.2", 1, "100.64.0.1", 2), guest, outbound: false, 0));            // no in rules
    }

    // TCP behind IPv6 extension headers is still TCP to the rules: a deny cannot be walked around.
    [Theory]
    [InlineData(60)]      // destination options
    [InlineData(0)]       // hop-by-hop
    [InlineData(44)]      // fragment (the first: offset 0, it has the ports)
    public void Ipv6ExtensionHeaders_ReachTheTransportHeader(byte extension)
    {
        var (f, _, guest) = Make("deny in tcp 22 from guest", "allow in any");
        byte[] p = new byte[40 + 8 + 20];
        p[0] = 0x60;
        p[Ip.V6NextHeaderOffset] = extension;
        p[40] = Ip.ProtocolTcp;                                   // the extension's next header
        p[41] = 0;                                                // 8 bytes long
        System.Buffers.Binary.BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(48), 40000);
        System.Buffers.Binary.BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(50), 22);
        Assert.False(f.Allow(p, guest, outbound: false, 0));
        System.Buffers.Binary.BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(50), 23);
        Assert.True(f.Allow(p, guest, outbound: false, 0));
    }

    [Theory]
    [InlineData("*", "anything", true)]
    [InlineData("admin-*", "admin-bee", true)]
    [InlineData("admin-*", "admin", false)]
    [InlineData("*-lab", "printer-lab", true)]
    [InlineData("a*b*c", "aXbYc", true)]
    [InlineData("a*b*c", "aXbY", false)]
    [InlineData("gw", "gw2", false)]
    public void Glob_Matches(string pattern, string name, bool match) => Assert.Equal(match, PacketFilter.Glob(pattern, name));

    // A flood of distinct flows fills the fixed table; it never grows, and new flows keep being
    // remembered (the oldest of their probe run gives way).
    [Fact]
    public void FlowTable_Bounded_UnderAFloodOfFlows()
    {
        var (f, admin, _) = Make("in tcp 22");
        byte[] p = Udp("100.64.0.1", 1, "100.64.0.2", 2);
        bool all = true;
        void Flood(int from, int count)
        {
            for (int i = from; i < from + count; i++)
            {
                System.Buffers.Binary.BinaryPrimitives.WriteUInt16BigEndian(p.AsSpan(20), (ushort)i);
                p[15] = (byte)(i >> 16);
                all &= f.Allow(p, admin, outbound: true, 1000);
            }
        }
        int next = 0;                                      // nothing per packet: each round 1,000 new flows
        Allocations.AssertNone(() => { Flood(next, 1_000); next += 1_000; }, PacketFilter.FlowSlots / 1_000 + 1);
        Assert.True(all);
        Assert.InRange(f.LiveFlows(1000), PacketFilter.FlowSlots / 2, PacketFilter.FlowSlots);
        // the newest flow is remembered: its reply passes the in rules
        Assert.True(f.Allow(Swap(p), admin, outbound: false, 1001));
    }

    // The reply of p: addresses and ports swapped.
    private static byte[] Swap(byte[] p)
    {
        byte[] r = (byte[])p.Clone();
        p.AsSpan(12, 4).CopyTo(r.AsSpan(16));
        p.AsSpan(16, 4).CopyTo(r.AsSpan(12));
        p.AsSpan(20, 2).CopyTo(r.AsSpan(22));
        p.AsSpan(22, 2).CopyTo(r.AsSpan(20));
        return r;
    }

    [Fact]
    public void Node_FilteredInbound_CountedAndNotWritten_ReloadSwapsRules()
    {
        var t = TestNet.FullMesh(2, c => c.Filters.Add("in udp 7"));
        t.Start();
        TestNode a = t.Nodes[0], b = t.Nodes[1];
        int written = b.Tun.Written.Count, dropped = t.Drops(1, DropReason.Filtered);
        a.Tun.Inject(Packets.Udp4("100.64.0.1", 1000, "100.64.0.2", 8, new byte[8]));
        t.Pump();
        Assert.Equal(written, b.Tun.Written.Count);
        Assert.Equal(dropped + 1, t.Drops(1, DropReason.Filtered));
        a.Tun.Inject(Packets.Udp4("100.64.0.1", 1000, "100.64.0.2", 7, new byte[8]));
        t.Pump();
        Assert.Equal(written + 1, b.Tun.Written.Count);
        // a reload without rules: everything passes
        UpConfig cfg = TestNet.ConfigOf(b);
        b.Node.Apply(cfg, t.NowMs);
        Assert.Null(b.Node.Filter);
        a.Tun.Inject(Packets.Udp4("100.64.0.1", 1000, "100.64.0.2", 8, new byte[8]));
        t.Pump();
        Assert.Equal(written + 2, b.Tun.Written.Count);
    }
}
