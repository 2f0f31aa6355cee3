using static Veil.Tests.TestNet;

namespace Veil.Tests;

/// <summary>Isolated members (§15): a gateway's own marks on the packet path, the Isolated exchange
/// message, how members apply and lift marks, and the state file keeping them.</summary>
public class IsolationTests
{
    // Node 0 is the gateway and knows 1 and 2 (2 marked isolated unless told otherwise); 1 knows only 0.
    // 2 knows 0, and 1 as well when xKnowsB (say, from before it was marked): the mark must hold anyway.
    private static TestNet Gateway(bool isolated = true, bool xKnowsB = false) =>
        TestNet.Mesh(3, i => i == 0 ? [1, 2] : i == 2 && xKnowsB ? [0, 1] : [0], (i, c) => { if (i == 0) c.Peers[1].Isolated = isolated; });

    private static bool Up(TestNode at, TestNode other) => at.Node.FindPeer(other.Public)?.Up == true;

    [Fact]
    public void MarkedMember_ReachesTheGatewayOnly_OthersRefuseItsSessions()
    {
        var t = Gateway(xKnowsB: true);
        t.Start();
        TestNode g = t.Nodes[0], b = t.Nodes[1], x = t.Nodes[2];
        Assert.True(t.AdvanceUntil(() => Up(g, b) && Up(g, x) && b.Node.Mesh.BarredCount == 1, 30_000) >= 0);
        t.Advance(90_000, 1_000);                             // x knows b and keeps trying
        Assert.False(Up(b, x));
        Assert.False(Up(x, b));
        Assert.True(b.Node.Mesh.IsolatedRefused > 0, "b never saw x's handshake");
        Assert.Contains("reason=isolated", b.LogText.ToString());
        Assert.Single(g.Node.Mesh.OwnMarks);
        Assert.Equal(0, x.Node.Mesh.BarredCount);              // the gateway tells x nothing of its marks
        Assert.Equal(0, x.Node.Mesh.MembersLearned);           // nor of any member (no Members to an isolated peer)
        Assert.Equal(0, b.Node.Mesh.MembersLearned);           // and nobody of x
        Assert.Equal(1, t.Send(2, 0));                         // x and b still reach the gateway
        Assert.Equal(1, t.Send(1, 0));
        Assert.Equal(0, t.Send(2, 1));
        Assert.Equal(0, t.Send(1, 2));
    }

    [Fact]
    public void Unmarked_OnReload_TheMembersMeet()
    {
        var t = Gateway(xKnowsB: true);
        t.Start();
        TestNode g = t.Nodes[0], b = t.Nodes[1], x = t.Nodes[2];
        Assert.True(t.AdvanceUntil(() => b.Node.Mesh.BarredCount == 1, 30_000) >= 0);
        UpConfig cfg = TestNet.MeshConfig(0, t.Keys, [1, 2]);     // the same config, nobody isolated
        g.Node.Apply(cfg, t.NowMs);
        Assert.Empty(g.Node.Mesh.OwnMarks);
        Assert.True(t.AdvanceUntil(() => b.Node.Mesh.BarredCount == 0, 30_000) >= 0, "b kept the mark");
        Assert.True(t.AdvanceUntil(() => Up(b, x) && Up(x, b), 180_000) >= 0, "b and x never met");
        t.Advance(2_000);                                     // their Selfs, with the claims
        Assert.Equal(1, t.Send(2, 1));
    }

    [Fact]
    public void Mark_AppliedToAMemberAlreadyUp_DropsItsSessions()
    {
        var t = Gateway(isolated: false);
        t.Start();
        TestNode g = t.Nodes[0], b = t.Nodes[1], x = t.Nodes[2];
        Assert.True(t.AdvanceUntil(() => Up(b, x), 60_000) >= 0);
        UpConfig cfg = TestNet.MeshConfig(0, t.Keys, [1, 2]);
        cfg.Peers[1].Isolated = true;
        g.Node.Apply(cfg, t.NowMs);
        Assert.True(t.AdvanceUntil(() => b.Node.FindPeer(x.Public) == null, 10_000) >= 0, "b kept x");
        Assert.Contains("event=peer_isolated", b.LogText.ToString());
        Assert.DoesNotContain(b.Node.RouteList, r => r.Prefix.ToString() == "100.64.0.3/32");
        t.Advance(30_000, 1_000);
        Assert.False(Up(b, x));
        Assert.Equal(0, t.Send(1, 2));
    }

    // The gateway's own check: what an isolated peer sends another peer through it, and the reverse,
    // stops before its TUN; what each sends the gateway itself passes.
    [Fact]
    public void Gateway_CarriesNothingBetweenAnIsolatedPeerAndOthers()
    {
        var t = TestNet.FullMesh(3, c =>
        {
            string self = new[] { "100.64.0.1", "100.64.0.2", "100.64.0.3" }.First(x => !c.Peers.Exists(p => p.Allowed.Exists(a => a.ToString() == x + "/32")));
            if (self == "100.64.0.2") { c.Peers.Find(p => p.Allowed.Exists(a => a.ToString() == "100.64.0.3/32"))!.Isolated = true; return; }
            string other = self == "100.64.0.1" ? "100.64.0.3" : "100.64.0.1";
            c.Peers.RemoveAll(p => p.Allowed.Exists(a => a.ToString() == other + "/32"));
            c.Peers.Find(p => p.Allowed.Exists(a => a.ToString() == "100.64.0.2/32"))!.Allowed.Add(IpPrefix.Parse(other + "/32"));
        });
        t.Start();
        TestNode a = t.Nodes[0], hub = t.Nodes[1], c = t.Nodes[2];
        int before = hub.Tun.Written.Count;
        a.Tun.Inject(Packets.Udp4("100.64.0.1", "100.64.0.3", 20));
        c.Tun.Inject(Packets.Udp4("100.64.0.3", "100.64.0.1", 20));
        t.Pump();
        Assert.Equal(before, hub.Tun.Written.Count);
        Assert.Equal(2, t.Drops(1, DropReason.Isolated));
        Assert.Equal(1, t.Send(0, 1));
        Assert.Equal(1, t.Send(2, 1));
        Assert.True(hub.Node.Relays.Offered);                  // only --isolate stops relaying
    }

    // ---- the message and how a member applies it ----

    private static byte[] Isolated(uint gen, int part, int parts, params Key32[] keys)
    {
        byte[] buf = new byte[Tune.MaxExchangeLen];
        return buf[..ExchangeMessage.WriteIsolated(buf, gen, part, parts, [.. keys], 0, keys.Length)];
    }

    [Fact]
    public void Isolated_GoldenBytes_AndBoundsChecked()
    {
        Key32 k = default;
        for (int i = 0; i < 32; i++) k[i] = (byte)i;
        byte[] msg = Isolated(0x01020304, 1, 2, k);
        Assert.Equal("07" + "01020304" + "01" + "02" + "01" + Convert.ToHexString(k).ToLowerInvariant(), Convert.ToHexString(msg).ToLowerInvariant());
        var m = new ExchangeMessage();
        Assert.True(m.Parse(msg));
        Assert.Equal((0x01020304u, 1, 2), (m.MarkGeneration, m.MarkPart, m.MarkParts));
        Assert.True(m.Marks.Single().EqualsCt(k));
        Assert.True(m.Parse(Isolated(5, 0, 1)));                                    // an empty set
        Assert.False(m.Parse(msg[..^1]));                                             // cut short
        Assert.False(m.Parse([.. msg, 0]));                                           // a byte too many
        Assert.False(m.Parse(Isolated(5, 2, 2, k)));                                  // part past parts
        Assert.False(m.Parse(Isolated(5, 0, 0, k)));                                  // no parts
        Assert.False(m.Parse(Isolated(5, 0, ExchangeMessage.MaxMarkParts + 1, k)));   // more than a member may mark
        byte[] lying = Isolated(5, 0, 1, k);
        lying[7] = 2;                                                                 // says two keys, holds one
        Assert.False(m.Parse(lying));
        Assert.False(m.Parse(msg[..7]));                                              // header cut short
        Assert.Equal(ExchangeMessage.MaxMarksPerMessage, (Tune.MaxExchangeLen - 8) / 32);
    }

    private static Key32 Key(byte seed) => TestNode.KeyFromSeed(seed);

    // A member applies another's marks exactly: new ones at once, dropped ones once the whole new
    // set is in, none that name itself or the marker, none from a member it isolates itself.
    [Fact]
    public void Marks_NewCountAtOnce_DroppedOnlyWhenTheWholeSetArrived()
    {
        var t = Gateway(isolated: false);
        t.Start();
        TestNode g = t.Nodes[0], b = t.Nodes[1];
        Assert.True(t.AdvanceUntil(() => Up(b, g), 10_000) >= 0);
        Mesh m = b.Node.Mesh;
        Peer bg = PeerOf(b, g);
        Key32 x = Key(70), y = Key(71);
        bool Barred(Key32 k) => m.Refuses(k);
        m.Receive(bg, Isolated(7, 0, 1, x), t.NowMs);
        Assert.True(Barred(x));
        m.Receive(bg, Isolated(8, 0, 2, y), t.NowMs);                 // a new set, first of two parts
        Assert.True(Barred(x) && Barred(y));                          // x stays until the set is whole
        m.Receive(bg, Isolated(8, 0, 2, y), t.NowMs);                 // a repeat changes nothing
        m.Receive(bg, Isolated(8, 1, 2), t.NowMs);
        Assert.False(Barred(x));
        Assert.True(Barred(y));
        m.Receive(bg, Isolated(9, 0, 1, b.Public, g.Public), t.NowMs); // itself and the marker: ignored
        Assert.Equal(0, m.BarredCount);
        Assert.False(Barred(b.Public));
        Assert.False(Barred(g.Public));
        m.Receive(bg, Isolated(10, 0, 1, x), t.NowMs);
        Assert.True(Barred(x));
        // A Self without the marks flag withdraws the marker's marks.
        byte[] self = new byte[Tune.MaxExchangeLen];
        int n = ExchangeMessage.WriteSelf(self, "n0", default, [], [], 0);
        m.Receive(bg, self[..n], t.NowMs);
        Assert.False(Barred(x));
        // A member b marks isolated itself marks nobody for b.
        bg.Isolated = true;
        m.Receive(bg, Isolated(11, 0, 1, x), t.NowMs);
        Assert.False(Barred(x));
    }

    // Marks come only from peers of our own config, and a late datagram of an older generation
    // lifts nothing.
    [Fact]
    public void Marks_FromALearnedMember_Ignored_LateGenerationIgnored()
    {
        var t = Gateway(isolated: false);
        t.Start();
        TestNode g = t.Nodes[0], b = t.Nodes[1], x = t.Nodes[2];
        Assert.True(t.AdvanceUntil(() => Up(b, g) && Up(b, x), 60_000) >= 0);
        Mesh m = b.Node.Mesh;
        Key32 k = Key(72), k2 = Key(73);
        m.Receive(PeerOf(b, x), Isolated(1, 0, 1, k), t.NowMs);            // x is a member b learned: no say
        Assert.False(m.Refuses(k));
        Assert.Equal(1, m.MarksDropped);
        Peer bg = PeerOf(b, g);
        m.Receive(bg, Isolated(20, 0, 1, k), t.NowMs);
        m.Receive(bg, Isolated(19, 0, 1, k2), t.NowMs);                    // older, seconds later: late
        Assert.True(m.Refuses(k));
        Assert.False(m.Refuses(k2));
        t.Advance(Tune.MarkReorderWindowMs + 1_000, 1_000);
        m.Receive(bg, Isolated(19, 0, 1, k2), t.NowMs);                    // much later: the gateway restarted
        Assert.True(m.Refuses(k2));
        Assert.False(m.Refuses(k));
    }

    [Fact]
    public void Marks_BoundedPerMember()
    {
        var t = Gateway(isolated: false);
        t.Start();
        TestNode g = t.Nodes[0], b = t.Nodes[1];
        Assert.True(t.AdvanceUntil(() => Up(b, g), 10_000) >= 0);
        Peer bg = PeerOf(b, g);
        int per = ExchangeMessage.MaxMarksPerMessage, parts = ExchangeMessage.MaxMarkParts;
        for (int part = 0; part < parts; part++)
        {
            var keys = new Key32[per];
            for (int i = 0; i < per; i++) { keys[i] = default; keys[i][0] = 1; keys[i][1] = (byte)part; keys[i][2] = (byte)i; }
            b.Node.Mesh.Receive(bg, Isolated(3, part, parts, keys), t.NowMs);
        }
        Assert.Equal(Tune.MaxMarksPerMember, b.Node.Mesh.BarredCount);
        Assert.Equal(parts * per - Tune.MaxMarksPerMember, b.Node.Mesh.MarksDropped);
    }

    [Fact]
    public void Marks_KeptInTheStateFile_AndRefusedWhenMalformed()
    {
        var t = Gateway();
        t.Start();
        TestNode b = t.Nodes[1], x = t.Nodes[2];
        Assert.True(t.AdvanceUntil(() => b.Node.Mesh.BarredCount == 1, 30_000) >= 0);
        string text = b.Node.StateText();
        Assert.Contains($"isolated {t.Nodes[0].Public.ToBase64()} {x.Public.ToBase64()}\n", text);

        // A restarted b: the mark is there before any member speaks, and x is not remembered.
        var fresh = TestNet.Mesh(3, i => i == 0 ? [1, 2] : [0]);
        Node b2 = fresh.Nodes[1].Node;
        string withX = text + $"member {x.Public.ToBase64()} n2 192.0.2.3:51820\n";
        Assert.Null(b2.LoadState(withX, 0, out int restored));
        Assert.Equal(0, restored);
        Assert.Equal(1, b2.Mesh.BarredCount);
        Assert.True(b2.Mesh.Refuses(x.Public));

        Node b3 = TestNet.Mesh(3, i => i == 0 ? [1, 2] : [0]).Nodes[1].Node;
        foreach (string bad in new[] { "isolated", $"isolated {x.Public.ToBase64()}", $"isolated {x.Public.ToBase64()} notakey" })
            Assert.NotNull(b3.LoadState(Node.StateHeader + "\n" + bad + "\n", 0, out _));
        Assert.Equal(0, b3.Mesh.BarredCount);
    }

    // A member's own config wins: a key it names itself is not refused for a mark.
    [Fact]
    public void Mark_OnAConfiguredPeer_IsNotApplied()
    {
        var t = TestNet.Mesh(3, i => i == 0 ? [1, 2] : i == 1 ? [0, 2] : [0], (i, c) => { if (i == 0) c.Peers[1].Isolated = true; });
        t.Start();
        TestNode b = t.Nodes[1], x = t.Nodes[2];
        Assert.True(t.AdvanceUntil(() => b.Node.Mesh.BarredCount == 1 && Up(b, x), 60_000) >= 0);
        Assert.False(b.Node.Mesh.Refuses(x.Public));
        Assert.Equal(1, t.Send(1, 2));
    }
}

/// <summary>--exit-for: the exit serves only the members it names, and what the others send for the
/// uplink is dropped even when they route it to the exit themselves.</summary>
public class ExitForTests
{
    private static bool HasDefault(TestNode at, TestNode from) => at.Node.FindPeer(from.Public)?.Claims.Exists(c => c.Prefix.Bits == 0) == true;

    [Fact]
    public void ExitFor_OnlyNamedMembersGetTheDefaultRoute_OthersTrafficForTheUplinkDropped()
    {
        // 0 is the exit, serving n1 only (a name its config gives); 2 routes 0.0.0.0/0 to it by its
        // own config all the same.
        var t = TestNet.Mesh(3, i => i == 0 ? [1, 2] : [0], (i, c) =>
        {
            if (i == 0) { c.Exit = true; c.ExitFor.Add("n1"); c.Peers[0].Name = "n1"; c.Peers[1].Name = "n2"; c.Peers[0].NameGiven = c.Peers[1].NameGiven = true; }
            else c.ExitNode = "n0";
            if (i == 2) c.Peers[0].Allowed.Add(IpPrefix.Parse("0.0.0.0/0"));
        });
        t.Start();
        TestNode exit = t.Nodes[0], served = t.Nodes[1], other = t.Nodes[2];
        Assert.True(t.AdvanceUntil(() => HasDefault(served, exit) && other.Node.FindPeer(exit.Public)?.Up == true, 30_000) >= 0);
        t.Advance(5_000);
        Assert.False(HasDefault(other, exit));
        Assert.True(exit.Node.ExitRefused(PeerOf(exit, other)));
        Assert.False(exit.Node.ExitRefused(PeerOf(exit, served)));

        int written = exit.Tun.Written.Count;
        served.Tun.Inject(Packets.Udp4("100.64.0.2", "198.51.100.9", 20));
        t.Pump();
        Assert.Equal(written + 1, exit.Tun.Written.Count);                 // served: out it goes
        other.Tun.Inject(Packets.Udp4("100.64.0.3", "198.51.100.9", 20));
        t.Pump();
        Assert.Equal(written + 1, exit.Tun.Written.Count);                 // the other: dropped
        Assert.Equal(1, t.Drops(0, DropReason.ExitRefused));
        other.Tun.Inject(Packets.Udp4("100.64.0.3", "100.64.0.1", 20));    // the exit's own address: fine
        t.Pump();
        Assert.Equal(written + 2, exit.Tun.Written.Count);

        // A reload that serves everybody: the other member gets the default route too.
        UpConfig cfg = TestNet.MeshConfig(0, t.Keys, [1, 2]);
        cfg.Exit = true;
        exit.Node.Apply(cfg, t.NowMs);
        Assert.True(t.AdvanceUntil(() => HasDefault(other, exit), 5_000) >= 0);
        Assert.False(exit.Node.ExitRefused(PeerOf(exit, other)));
    }

    [Theory]
    [InlineData("laptop-*", "laptop-3", false)]
    [InlineData("laptop-*", "phone", true)]
    [InlineData("phone", "phone", false)]
    public void ExitFor_NamePatterns(string pattern, string name, bool refused)
    {
        var t = TestNet.FullMesh(2);
        Node n = t.Nodes[0].Node;
        UpConfig cfg = TestNet.ConfigOf(t.Nodes[0]);
        cfg.Exit = true;
        cfg.ExitFor.Add(pattern);
        cfg.Peers[0].NameGiven = true;
        n.Apply(cfg, t.NowMs);
        Peer p = n.Peers[0];
        p.Name = name;
        Assert.Equal(refused, n.ExitRefused(p));
        p.NamedByConfig = false;                                            // a name the member announced itself
        p.Name = new string(name);
        Assert.True(n.ExitRefused(p));
        cfg.ExitFor[0] = p.PublicKey.ToBase64();                            // a key names it whatever its name
        n.Apply(cfg, t.NowMs);
        p.Name = name;
        Assert.False(n.ExitRefused(p));
    }
}

/// <summary>A peer's own secret (`psk` in its [[peer]]): the handshake with that peer mixes it in
/// instead of the network's, and a rotation of the network's leaves it.</summary>
public class PeerPskTests
{
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void OwnSecret_OnlyThePeerHoldingItGetsIn(bool peerHoldsIt)
    {
        Key32 own = TestNode.KeyFromSeed(90);
        var t = TestNet.Mesh(2, i => i == 0 ? [1] : [0], (i, c) =>
        {
            if (i == 0) { c.Peers[0].PskFile = "own.psk"; c.Peers[0].Psk = own; }
            else if (peerHoldsIt) c.Psk = own;                // the guest's network.psk is that secret
        }, mesh: false);
        t.Start();
        bool up = t.AdvanceUntil(() => t.Nodes[0].Node.FindPeer(t.Nodes[1].Public)?.Up == true, 20_000) >= 0;
        Assert.Equal(peerHoldsIt, up);
        if (!peerHoldsIt) return;
        Peer p = TestNet.PeerOf(t.Nodes[0], t.Nodes[1]);
        Assert.True(p.OwnPsk);
        UpConfig cfg = TestNet.MeshConfig(0, t.Keys, [1], mesh: false);
        cfg.Peers[0].PskFile = "own.psk";
        cfg.Peers[0].Psk = own;
        cfg.Psk = TestNode.KeyFromSeed(91);
        cfg.SecretsRead = true;                               // a rotation of the network secret
        t.Nodes[0].Node.Apply(cfg, t.NowMs);
        Assert.True(p.Psk.EqualsCt(own));
    }
}
