using System.Net;

namespace Veil.Tests;

/// <summary>A reload applied to a running node (§14 Node.Apply): peers kept, removed and added, routes following, in process.</summary>
public class ReloadTests
{
    [Fact]
    public void Apply_UnchangedPeers_KeepTheirSessions()
    {
        var t = TestNet.FullMesh(3);
        t.Start();
        Session before = t.Nodes[0].Node.Peers[0].Current!;
        t.Nodes[0].Node.Apply(TestNet.ConfigOf(t.Nodes[0]), t.NowMs);
        Assert.Same(before, t.Nodes[0].Node.Peers[0].Current);
        Assert.Equal(1, t.Send(0, 1));
    }

    [Fact]
    public void Apply_RemovedPeer_SessionsRoutesAndKeyGone_OthersUntouched()
    {
        var t = TestNet.FullMesh(3);
        t.Start();
        var cfg = TestNet.ConfigOf(t.Nodes[0]);
        cfg.Peers.RemoveAt(1);                        // drop node 2
        Session kept = t.Nodes[0].Node.Peers[0].Current!;
        t.Nodes[0].Node.Apply(cfg, t.NowMs);
        Peer removed = t.Nodes[0].Node.Peers[1];
        Assert.False(removed.Active);
        Assert.Null(removed.Current);
        Assert.True(removed.StaticShared.IsZero());
        Assert.Equal(0, t.Send(0, 2));
        Assert.Equal(1, t.Drops(0, DropReason.NoRoute));
        Assert.Same(kept, t.Nodes[0].Node.Peers[0].Current);
        Assert.Equal(1, t.Send(0, 1));
        // node 2 can no longer get in either
        Assert.Equal(0, t.Send(2, 0));
    }

    [Fact]
    public void Apply_AddedPeer_ReusesFreedSlotAndConnects()
    {
        var t = TestNet.FullMesh(3);
        t.Start();
        var cfg = TestNet.ConfigOf(t.Nodes[0]);
        PeerConfig third = cfg.Peers[1];
        cfg.Peers.RemoveAt(1);
        t.Nodes[0].Node.Apply(cfg, t.NowMs);
        cfg.Peers.Add(third);
        t.Nodes[0].Node.Apply(cfg, t.NowMs);
        t.Pump();
        Assert.Equal(2, t.Nodes[0].Node.Peers.Count);          // the slot was reused
        Assert.Equal(1, t.Send(0, 2));
        Assert.Equal(1, t.Send(2, 0));
    }

    [Fact]
    public void Apply_ChangedAllowedIps_RoutesFollow_SessionKept()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        var cfg = TestNet.ConfigOf(t.Nodes[0]);
        cfg.Peers[0].Allowed.Add(IpPrefix.Parse("203.0.113.0/24"));
        cfg.Peers[0].Name = "renamed";
        Session s = t.Nodes[0].Node.Peers[0].Current!;
        t.Nodes[0].Node.Apply(cfg, t.NowMs);
        Assert.Same(s, t.Nodes[0].Node.Peers[0].Current);
        Assert.Equal("renamed", t.Nodes[0].Node.Peers[0].Name);
        Assert.Equal(0, t.Nodes[0].Node.Routes.Lookup(IPAddress.Parse("203.0.113.7").GetAddressBytes()));
    }
}
