namespace Veil.Tests;

/// <summary>§9 timers at exact deadlines: the jitter is the node's (Node.Jitter), fixed here.</summary>
public sealed class TimerTests
{
    private static (TestNet T, Node A, Peer B) Pair(Func<long, long> jitter)
    {
        var t = TestNet.FullMesh(2);
        foreach (TestNode n in t.Nodes) n.Node.Jitter = jitter;
        return (t, t.Nodes[0].Node, t.Nodes[0].Node.Peers[0]);
    }

    [Theory]
    [InlineData(0L)]
    [InlineData(-1L)]                                   // -1: the largest jitter allowed
    public void Retransmit_DoublesFromOneSecondToRekeyTimeout_PlusExactJitter(long fixedJitter)
    {
        var (t, a, b) = Pair(max => fixedJitter < 0 ? max : fixedJitter);
        long jitter = fixedJitter < 0 ? Spec.RekeyTimeoutJitterMaxMs : 0;
        t.Net.Filter = (_, _, _) => false;              // no ServerHello ever comes
        long start = t.NowMs;
        Assert.Equal(0, t.Send(0, 1));
        var deadlines = new List<long> { b.RetransmitHandshakeAtMs - start };
        for (int i = 0; i < 5; i++)
        {
            long at = b.RetransmitHandshakeAtMs;
            t.Advance(at - t.NowMs, at - t.NowMs);     // exactly to the deadline
            deadlines.Add(b.RetransmitHandshakeAtMs - at);
        }
        long[] expect = [1_000, 2_000, 4_000, 5_000, 5_000, 5_000];
        Assert.Equal(expect.Select(d => d + jitter), deadlines);
        Assert.Equal(6, b.HandshakeAttempts);
    }

    [Fact]
    public void Reconnect_OneSecondDoublingTo120_PlusAQuarterAtMost()
    {
        var (_, _, b) = Pair(max => max);
        long[] got = Enumerable.Range(0, 10).Select(k => b.ReconnectDelayMs(k)).ToArray();
        Assert.Equal(new long[] { 1_250, 2_500, 5_000, 10_000, 20_000, 40_000, 80_000, 150_000, 150_000, 150_000 }, got);
        b.Jitter = _ => 0;
        Assert.Equal(120_000, b.ReconnectDelayMs(30));
    }

    [Fact]
    public void DataOneWay_ArmsKeepaliveAndNewHandshake_AtTheirExactTimes()
    {
        var (t, a, b) = Pair(_ => 0);
        Assert.Equal(1, t.Send(0, 1));
        Assert.Equal(1, t.Send(1, 0));                  // both sides confirmed
        Peer ba = t.Nodes[1].Node.Peers[0];
        long sentAt = t.NowMs;
        Assert.Equal(1, t.Send(0, 1));                  // a sends data, b does not answer
        Assert.Equal(sentAt + Spec.KeepaliveTimeoutMs + Spec.RekeyTimeoutMs, b.NewHandshakeAtMs);
        Assert.Equal(sentAt + Spec.KeepaliveTimeoutMs, ba.SendKeepaliveAtMs);
        t.Advance(Spec.KeepaliveTimeoutMs - 100, 100);
        Assert.NotEqual(0, ba.SendKeepaliveAtMs);       // not yet
        long rx = a.Counters.RxRecords;
        t.Advance(100, 100);
        Assert.Equal(0, ba.SendKeepaliveAtMs);          // sent at the deadline
        Assert.Equal(rx + 1, a.Counters.RxRecords);     // and a got it: its new-handshake timer is off
        Assert.Equal(0, b.NewHandshakeAtMs);
    }

    [Fact]
    public void PeerState_FollowsItsDiagram()
    {
        var p = new Peer(0, new PeerConfig { PublicKey = TestNode.KeyFromSeed(9) }, default, 0, 1420);
        Assert.Equal((PeerState.Down, PeerOrigin.Configured), (p.State, p.Origin));
        Assert.True(p.Active && !p.Up && !p.Learned && !p.Provisional);
        p.OnLearned(provisional: true);                                // a ClientHello made it
        Assert.True(p.Learned && p.Provisional);
        p.OnConfirmed();                                               // its first record: up, and a member
        Assert.Equal((PeerState.Up, PeerOrigin.Learned), (p.State, p.Origin));
        p.OnLost();
        Assert.Equal(PeerState.Down, p.State);
        p.OnConfigured();                                              // a reload names it
        Assert.Equal(PeerOrigin.Configured, p.Origin);
        p.OnRemoved();
        Assert.False(p.Active);
        Assert.Equal(PeerState.Removed, p.State);
    }
}
