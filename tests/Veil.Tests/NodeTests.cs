using System.Buffers.Binary;
using System.Net;

namespace Veil.Tests;

/// <summary>Two or three nodes in one process (loopback dataplane, in-memory UDP, test clock).</summary>
public class NodeTests
{
    private static int Drops(TestNode n, DropReason r) => (int)n.Node.Counters.Drops[(int)r];

    [Fact]
    public void Tunnel_FirstPacketBeforeAnyHandshake_IsDelivered()
    {
        var t = TestNet.FullMesh(2);
        byte[] p = Packets.Udp4("100.64.0.1", "100.64.0.2", 100, 7);
        t.Nodes[0].Tun.Inject(p);
        t.Pump();
        Assert.Single(t.Nodes[1].Tun.Written);
        Assert.Equal(p, t.Nodes[1].Tun.Written[0]);
        Assert.Equal(1, t.Nodes[0].Node.Counters.HandshakesCompleted);
        Assert.Equal(1, t.Nodes[1].Node.Counters.HandshakesCompleted);
    }

    [Fact]
    public void Tunnel_IPv4AndIPv6BothWays_Delivered()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        Assert.Equal(1, t.Send(0, 1));
        Assert.Equal(1, t.Send(1, 0));
        t.Nodes[0].Tun.Inject(Packets.Udp6("fd00:64::1", "fd00:64::2", 40));
        t.Nodes[1].Tun.Inject(Packets.Udp6("fd00:64::2", "fd00:64::1", 40));
        t.Pump();
        Assert.Equal(2, t.Nodes[1].Tun.Written.Count);
        Assert.Equal(2, t.Nodes[0].Tun.Written.Count);
    }

    [Theory]
    [InlineData("fe80::1", "ff02::2", true)]                // a router solicitation
    [InlineData("fe80::1", "ff02::16", true)]               // an MLDv2 report
    [InlineData("fd00:64::1", "fe80::9", true)]
    [InlineData("100.64.0.1", "224.0.0.251", true)]         // mDNS
    [InlineData("100.64.0.1", "255.255.255.255", true)]
    [InlineData("100.64.0.1", "169.254.1.1", true)]
    [InlineData("100.64.0.1", "10.1.2.3", false)]           // a real destination without a route
    [InlineData("fd00:64::1", "fd00:99::1", false)]
    public void Tun_NoRoute_KernelChatterCountedApart(string src, string dst, bool linkScope)
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        t.Nodes[0].Tun.Inject(src.Contains(':') ? Packets.Udp6(src, dst, 20) : Packets.Udp4(src, dst, 20));
        t.Pump();
        Assert.Equal(linkScope ? 1 : 0, Drops(t.Nodes[0], DropReason.LinkLocal));
        Assert.Equal(linkScope ? 0 : 1, Drops(t.Nodes[0], DropReason.NoRoute));
        Assert.Empty(t.Nodes[1].Tun.Written);
    }

    [Fact]
    public void Tunnel_ManyPacketsStagedBeforeHandshake_AllDeliveredInOrder()
    {
        var t = TestNet.FullMesh(2);
        for (int i = 0; i < Tune.MaxStagedPackets; i++) t.Nodes[0].Tun.Inject(Packets.Udp4("100.64.0.1", "100.64.0.2", 32, (byte)i));
        t.Pump();
        var got = t.Nodes[1].Tun.Written;
        Assert.Equal(Tune.MaxStagedPackets, got.Count);
        for (int i = 0; i < got.Count; i++) Assert.Equal((byte)i, got[i][28]);
    }

    [Fact]
    public void Outbound_NoRoute_DroppedAndCounted()
    {
        var t = TestNet.FullMesh(2);
        t.Nodes[0].Tun.Inject(Packets.Udp4("100.64.0.1", "100.64.0.77", 10));
        t.Pump();
        Assert.Equal(1, Drops(t.Nodes[0], DropReason.NoRoute));
        Assert.Empty(t.Nodes[1].Tun.Written);
    }

    [Fact]
    public void Inbound_SourceNotRoutedToSender_Dropped()
    {
        var t = TestNet.FullMesh(3);
        t.Start();
        // node 0 sends to node 1 a packet claiming node 2's overlay address as its source
        t.Nodes[0].Tun.Inject(Packets.Udp4("100.64.0.3", "100.64.0.2", 10));
        t.Pump();
        Assert.Empty(t.Nodes[1].Tun.Written);
        Assert.Equal(1, Drops(t.Nodes[1], DropReason.SourceNotAllowed));
    }

    [Fact]
    public void Rekey_Every3sFor20s_NoPacketLost()
    {
        var t = TestNet.FullMesh(2, c => c.RekeyAfterTimeMs = 3000);
        t.Start();
        int sent = 0, received = 0;
        for (int step = 0; step < 200; step++)
        {
            received += t.Send(0, 1, 100, (byte)step);
            received += t.Send(1, 0, 100, (byte)step);
            sent += 2;
            t.Advance(100);
        }
        Assert.Equal(sent, received);
        Assert.True(t.Nodes[0].Node.Counters.HandshakesCompleted + t.Nodes[1].Node.Counters.HandshakesCompleted >= 12,
            $"handshakes: {t.Nodes[0].Node.Counters.HandshakesCompleted} + {t.Nodes[1].Node.Counters.HandshakesCompleted}");
    }

    [Fact]
    public void Rekey_After120s_NewSessionAndNoLoss()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        Session first = t.Nodes[0].Node.Peers[0].Current!;
        int received = 0;
        for (int s = 0; s < 130; s++) { received += t.Send(0, 1); received += t.Send(1, 0); t.Advance(1000, 1000); }
        Assert.Equal(260, received);
        Assert.NotSame(first, t.Nodes[0].Node.Peers[0].Current);
        Assert.True(t.Nodes[0].Node.Peers[0].Current!.CreatedMs > first.CreatedMs + 119_000);
    }

    [Fact]
    public void Session_OlderThanRejectAfterTime_NeverUsed()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        t.Net.Filter = (_, _, _) => false;          // the network goes dark
        t.NowMs += Spec.RejectAfterTimeMs;
        Peer p = t.Nodes[0].Node.Peers[0];
        Assert.False(p.HasReadySession(t.NowMs, Spec.RejectAfterTimeMs));
        int sentBefore = t.Nodes[0].Udp.Sent.Count;
        t.Nodes[0].Tun.Inject(Packets.Udp4("100.64.0.1", "100.64.0.2", 10));
        t.Pump();
        // the only thing sent is a ClientHello, never a record under the old keys
        Assert.Single(t.Nodes[0].Udp.Sent.Skip(sentBefore));
        Assert.Equal(Spec.TlsHandshake, t.Nodes[0].Udp.Sent[^1][0]);
    }

    [Fact]
    public void Shutdown_SendsClose_PeerDropsSessionAtOnce()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        Assert.Equal("up", t.Nodes[1].Node.Peers[0].StateName(t.NowMs, Spec.RejectAfterTimeMs));
        t.Nodes[0].Node.Shutdown(t.NowMs);
        t.Nodes[0].Worker.FlushUdp(t.Nodes[0].Node.UdpOut);
        t.Nodes.RemoveAt(0);
        t.Pump();
        Assert.NotEqual("up", t.Nodes[0].Node.Peers[0].StateName(t.NowMs, Spec.RejectAfterTimeMs));
        Assert.Contains("event=session_closed", t.Nodes[0].LogText.ToString());
    }

    [Fact]
    public void PeerRestart_WithNewProcess_TalkingAgainQuickly()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        Assert.Equal(1, t.Send(0, 1));
        // node 1 is killed (-9: no close record) and a new process starts with the same key
        var fresh = TestNet.FullMesh(2);
        t.Nodes[1].Udp.Dispose();
        t.Nodes[1] = new TestNode(t.Net, t.Nodes[1].Private, NodeConfigOf(fresh, 1), TestNet.Ep(1), "100.64.0.2", 1_800_000_000_000_000_000L);
        t.Nodes[1].Node.Start(t.NowMs);
        t.Nodes[1].Worker.FlushUdp(t.Nodes[1].Node.UdpOut);
        t.Pump();
        Assert.Equal(1, t.Send(0, 1));
        Assert.Equal(1, t.Send(1, 0));
    }

    [Fact]
    public void PeerRestart_ThatDoesNotInitiate_RecoveredWithin15s()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        var cfg = NodeConfigOf(TestNet.FullMesh(2), 1);
        cfg.Peers[0].Endpoint = default;            // the new process does not know where node 0 is
        t.Nodes[1].Udp.Dispose();
        t.Nodes[1] = new TestNode(t.Net, t.Nodes[1].Private, cfg, TestNet.Ep(1), "100.64.0.2", 1_800_000_000_000_000_000L);
        int received = 0;
        long start = t.NowMs;
        while (received == 0 && t.NowMs - start <= 15_000)
        {
            received += t.Send(0, 1);
            t.Advance(500);
        }
        Assert.True(received > 0, "no packet got through within 15 s");
    }

    private static UpConfig NodeConfigOf(TestNet fresh, int i)
    {
        // Rebuild the config the harness would give node i (peers, allowed prefixes, endpoints).
        var n = fresh.Nodes[i];
        var cfg = new UpConfig { PrivateKey = n.Private, Mtu = 1420 };
        foreach (Peer p in n.Node.Peers)
        {
            var pc = new PeerConfig { PublicKey = p.PublicKey, Endpoint = p.Endpoint };
            pc.Allowed.AddRange(p.Allowed);
            cfg.Peers.Add(pc);
        }
        return cfg;
    }

    [Fact]
    public void Roaming_PeerMovesToNewEndpoint_RepliesFollowIt()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        var moved = Endpoint.FromIp(IPAddress.Parse("203.0.113.9"), 40000);
        t.Nodes[1].Udp.Dispose();
        t.Nodes[1].Udp.Self = moved;
        t.Net.Hosts[moved] = t.Nodes[1].Udp;
        Assert.Equal(1, t.Send(1, 0));
        Assert.Equal(moved, t.Nodes[0].Node.Peers[0].Endpoint);
        Assert.Equal(1, t.Send(0, 1));
    }

    [Fact]
    public void ReplayedRecord_NotDelivered_CountedAsReplayed()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        byte[]? captured = null;
        t.Net.Filter = (_, _, d) => { if (d[0] == Spec.TlsApplicationData) captured = d; return true; };
        Assert.Equal(1, t.Send(0, 1));
        t.Net.Filter = null;
        t.Nodes[1].Udp.Deliver(captured!, t.Nodes[0].Endpoint);
        t.Pump();
        Assert.Single(t.Nodes[1].Tun.Written);
        Assert.Equal(1, Drops(t.Nodes[1], DropReason.Replayed));
    }

    [Fact]
    public void RandomDatagrams_NeverThrow_TunnelStillWorks()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        var rng = new Random(1234);
        var from = Endpoint.FromIp(IPAddress.Parse("198.51.100.99"), 999);
        uint liveIndex = t.Nodes[1].Node.Peers[0].Current!.LocalIndex;
        for (int i = 0; i < 5000; i++)
        {
            byte[] d = new byte[rng.Next(0, 1500)];
            rng.NextBytes(d);
            if (d.Length > 20 && i % 3 == 0)
            {
                // make it look like a record or a handshake so it gets past Classify
                d[0] = i % 2 == 0 ? Spec.TlsApplicationData : Spec.TlsHandshake;
                d[1] = 3; d[2] = 3;
                BinaryPrimitives.WriteUInt16BigEndian(d.AsSpan(3), (ushort)(d.Length - 5));
                if (i % 6 == 0) BinaryPrimitives.WriteUInt32BigEndian(d.AsSpan(7), liveIndex);
            }
            t.Nodes[1].Udp.Deliver(d, from);
        }
        t.Pump();
        Assert.Empty(t.Nodes[1].Tun.Written);
        long drops = t.Nodes[1].Node.Counters.Drops.Sum();
        Assert.True(drops >= 4900, $"drops {drops}");
        Assert.Equal(1, t.Send(0, 1));
        Assert.Equal(1, t.Send(1, 0));
    }

    [Fact]
    public void WrongPsk_NoTunnel_InitiatorLogsServerHelloAuth()
    {
        var t = TestNet.FullMesh(2, c => RandomNumberGeneratorFill(c));
        t.Start();
        Assert.Equal(0, t.Send(0, 1));
        Assert.Contains("reason=server_hello_auth", t.Nodes[0].LogText.ToString());
    }

    private static void RandomNumberGeneratorFill(UpConfig c) => System.Security.Cryptography.RandomNumberGenerator.Fill(c.Psk);

    [Fact]
    public void SamePsk_Tunnel()
    {
        var psk = TestNode.KeyFromSeed(99);
        var t = TestNet.FullMesh(2, c => c.Psk = psk);
        t.Start();
        Assert.Equal(1, t.Send(0, 1));
    }

    [Fact]
    public void WrongPeerKey_NoTunnel_ResponderLogsBadMac1()
    {
        var t = TestNet.FullMesh(2, c => { if (c.PrivateKey[1] == TestNode.KeyFromSeed(1)[1]) c.Peers[0].PublicKey = TestNode.KeyFromSeed(50); });
        t.Start();
        Assert.Equal(0, t.Send(0, 1));
        Assert.Contains("reason=bad_mac1", t.Nodes[1].LogText.ToString());
        Assert.True(Drops(t.Nodes[1], DropReason.BadMac1) > 0);
    }

    [Fact]
    public void UnknownStaticKey_ResponderLogsUnknownPeer()
    {
        var t = TestNet.FullMesh(2, c => { if (c.PrivateKey[1] == TestNode.KeyFromSeed(2)[1]) c.Peers[0].PublicKey = TestNode.KeyFromSeed(50); });
        t.Start();
        Assert.Equal(0, t.Send(0, 1));
        Assert.Contains("reason=unknown_peer", t.Nodes[1].LogText.ToString());
    }

    [Fact]
    public void Handshake_NoAnswer_RetransmitsWithBackoffThenGivesUp()
    {
        var t = TestNet.FullMesh(2);
        var hellos = new List<long>();
        t.Net.Filter = (from, _, d) => { if (from.Equals(t.Nodes[0].Endpoint)) hellos.Add(t.NowMs); return false; };
        t.Nodes[0].Tun.Inject(Packets.Udp4("100.64.0.1", "100.64.0.2", 10));
        t.Pump();
        t.Advance(200_000, 50);
        // The retransmit cycle: at most MaxHandshakeAttempts hellos within RekeyAttemptTime.
        List<long> cycle = hellos.FindAll(h => h - hellos[0] <= Spec.RekeyAttemptTimeMs);
        Assert.InRange(cycle.Count, 5, Spec.MaxHandshakeAttempts);
        long firstGap = cycle[1] - cycle[0], laterGap = cycle[^1] - cycle[^2];
        Assert.InRange(firstGap, Spec.FirstRetransmitMs, Spec.FirstRetransmitMs + Spec.RekeyTimeoutJitterMaxMs + 50);
        Assert.InRange(laterGap, Spec.RekeyTimeoutMs, Spec.RekeyTimeoutMs + Spec.RekeyTimeoutJitterMaxMs + 50);
        Assert.Contains("event=handshake_gave_up", t.Nodes[0].LogText.ToString());
        Assert.Equal(0, t.Nodes[0].Node.Peers[0].StagedCount);
        // Then reconnect attempts, one hello each, ever further apart (1 s doubling, capped at 120 s).
        List<long> after = hellos.FindAll(h => h - hellos[0] > Spec.RekeyAttemptTimeMs);
        Assert.InRange(after.Count, 3, 9);
        for (int i = 2; i < after.Count; i++) Assert.True(after[i] - after[i - 1] > after[i - 1] - after[i - 2] - 1000, "reconnect gaps grow");
    }

    [Fact]
    public void Staging_RingGrowsWithWhatWaits_KeepsOrder_AndIsLetGoOnceSent()
    {
        var t = TestNet.FullMesh(2);
        bool cut = true;
        t.Net.Filter = (_, _, _) => !cut;
        var sent = new List<byte[]>();
        for (byte i = 0; i < 20; i++) sent.Add(Packets.Udp4("100.64.0.1", "100.64.0.2", 40, i));
        foreach (byte[] packet in sent) t.Nodes[0].Tun.Inject(packet);
        t.Pump();
        Node a = t.Nodes[0].Node;
        Peer toB = a.Peers[0];
        Assert.Equal(20, toB.StagedCount);
        Assert.Equal(32 * a.Mtu, toB.StagedBytes);              // 8, 16, then 32 slots
        Assert.Equal(toB.StagedBytes, a.StagedBytes);
        cut = false;
        t.Advance(3_000, 50);                                   // the retransmitted hello gets through
        Assert.Equal(sent.Select(Convert.ToHexString), t.Nodes[1].Tun.Written.Select(Convert.ToHexString));
        Assert.Equal(0, toB.StagedCount);
        Assert.Equal(0, toB.StagedBytes);
        Assert.Equal(0, a.StagedBytes);
    }

    [Fact]
    public void Staging_GrowingAWrappedRing_KeepsTheOrder()
    {
        var p = new Peer(0, new PeerConfig { PublicKey = TestNet.PublicOf(TestNode.KeyFromSeed(9)) }, default, 0, 1420);
        long held = 0;
        byte next = 0, expected = 0;
        for (int i = 0; i < Tune.FirstStagedSlots; i++) Assert.True(p.Stage([next++], ref held));
        for (int i = 0; i < 3; i++) { Assert.Equal(expected++, p.PeekStaged()[0]); p.PopStaged(ref held); }
        for (int i = 0; i < 4; i++) Assert.True(p.Stage([next++], ref held));   // wraps, then grows
        Assert.Equal(2 * Tune.FirstStagedSlots * 1420, held);
        while (p.StagedCount > 0) { Assert.Equal(expected++, p.PeekStaged()[0]); p.PopStaged(ref held); }
        Assert.Equal(next, expected);
        Assert.Equal(0, held);
    }

    [Fact]
    public void Staging_AtTheNodesBound_NoNewRing_AndAFullRingDisplacesItsOldest()
    {
        const int mtu = 1420;
        var p = new Peer(0, new PeerConfig { PublicKey = TestNet.PublicOf(TestNode.KeyFromSeed(9)) }, default, 0, mtu);
        long held = Tune.MaxStagedBytes - Tune.FirstStagedSlots * mtu + 1;
        Assert.False(p.Stage([1, 2, 3], ref held));             // no room for a first ring: refused
        Assert.Equal(0, p.StagedCount);
        Assert.Equal(0, p.StagedBytes);
        held--;
        for (byte i = 0; i < Tune.FirstStagedSlots; i++) Assert.True(p.Stage([i], ref held));
        Assert.Equal(Tune.MaxStagedBytes, held);
        Assert.False(p.Stage([99], ref held));                  // it cannot grow: the oldest made room
        Assert.Equal(Tune.FirstStagedSlots, p.StagedCount);
        Assert.Equal(1, p.PeekStaged()[0]);
        Assert.False(p.Stage(new byte[mtu + 1], ref held));     // longer than a slot
        p.ClearStaged(ref held);
        Assert.Equal(Tune.MaxStagedBytes - Tune.FirstStagedSlots * mtu, held);
        Assert.Equal(0, p.StagedBytes);
    }

    // a says hello to b: the first hello (and its copies) never arrive, b's answers are caught;
    // the test delivers what it wants.
    private static (TestNet T, byte[] Hello, List<byte[]> Answers) CaughtHello()
    {
        var t = TestNet.FullMesh(2);
        var answers = new List<byte[]>();
        byte[]? hello = null;
        Endpoint a = TestNet.Ep(0), b = TestNet.Ep(1);
        t.Net.Filter = (from, _, d) =>
        {
            if (from.Equals(a) && Record.Classify(d) == RecordKind.ClientHello) { hello ??= d; return false; }
            if (from.Equals(b) && Record.Classify(d) == RecordKind.ServerHello) { answers.Add(d); return false; }
            return true;
        };
        t.Nodes[0].Node.StartHandshake(TestNet.PeerOf(t.Nodes[0], t.Nodes[1]), t.NowMs, retransmit: false);
        t.Nodes[0].Worker.FlushUdp(t.Nodes[0].Node.UdpOut);
        t.Pump();
        Assert.NotNull(hello);
        return (t, hello!, answers);
    }

    /// <summary>§10 retransmits: a copy of the hello b answered gets the same ServerHello again, found
    /// before any Diffie-Hellman (or after it, when another hello took its slot), at most
    /// MaxAnswerRepeats times, only while the session waits for its Bind, and nothing else changes.</summary>
    [Fact]
    public void RepeatedHello_GetsTheSameAnswer_AndChangesNothing()
    {
        var (t, hello, answers) = CaughtHello();
        Endpoint a = TestNet.Ep(0), b = TestNet.Ep(1);
        Node nb = t.Nodes[1].Node;
        Peer ba = TestNet.PeerOf(t.Nodes[1], t.Nodes[0]);
        void Copy(byte[] h) { t.Nodes[1].Udp.Deliver(h, a); t.Pump(); }
        Copy(hello);
        Session next = ba.Next!;
        Assert.Single(answers);
        // A byte changed after the ephemeral key: not the hello answered, so not its answer.
        byte[] forged = (byte[])hello.Clone();
        forged[Wire.ClientHelloMac1Offset - 1] ^= 1;
        Copy(forged);
        Assert.Single(answers);
        // The slow path: the slot was taken, so b finds the repeat after its first Diffie-Hellman.
        Array.Clear(nb.AnsweredBy);
        Copy(hello);
        Assert.Equal(2, answers.Count);
        for (int i = 0; i < Tune.MaxAnswerRepeats + 2; i++) Copy(hello);
        Assert.Equal(1 + Tune.MaxAnswerRepeats, answers.Count);
        Assert.All(answers, x => Assert.Equal(answers[0], x));
        Assert.Equal(Tune.MaxAnswerRepeats, nb.Counters.AnswersRepeated);
        Assert.Same(next, ba.Next);                    // no new session, and no other
        Assert.Null(ba.Current);
        // After the Bind (the late first answer completes a's side) a copy is not answered again.
        ba.AnswerRepeats = 0;
        t.Nodes[0].Udp.Deliver(answers[0], b);
        t.Pump();
        Assert.NotNull(ba.Current);
        Assert.Null(ba.Next);
        int stale = t.Drops(1, DropReason.StaleHello);
        Copy(hello);
        Assert.Equal(1 + Tune.MaxAnswerRepeats, answers.Count);
        Assert.Equal(stale + 1, t.Drops(1, DropReason.StaleHello));
    }

    /// <summary>A reconnect attempt is one hello; the next attempt within RekeyTimeoutMs sends that hello
    /// again, and a late answer to it completes the handshake even between attempts.</summary>
    [Fact]
    public void ReconnectAttempt_RepeatsTheUnansweredHello_AndItsLateAnswerCompletes()
    {
        var t = TestNet.FullMesh(2);
        var hellos = new List<byte[]>();
        var answers = new List<byte[]>();
        Endpoint a = TestNet.Ep(0), b = TestNet.Ep(1);
        t.Net.Filter = (from, _, d) =>
        {
            if (from.Equals(a) && Record.Classify(d) == RecordKind.ClientHello) hellos.Add(d);
            if (from.Equals(b) && Record.Classify(d) == RecordKind.ServerHello) { answers.Add(d); return false; }   // late, all
            return true;
        };
        Peer ab = TestNet.PeerOf(t.Nodes[0], t.Nodes[1]);
        ab.ReconnectAtMs = t.NowMs;
        t.AdvanceUntil(() => ab.Unanswered != null, 3_000);
        Assert.True(ab.Unanswered != null && ab.Pending == null && ab.ReconnectAtMs != 0, "the first attempt failed, its hello kept");
        t.AdvanceUntil(() => hellos.Count >= 2, 3_000);
        Assert.Equal(2, hellos.Count);
        Assert.Equal(hellos[0], hellos[1]);            // the second attempt, within 5 s: the same hello
        Assert.Equal(1, t.Nodes[0].Node.Counters.HandshakesInitiated);
        Assert.Equal(1, t.Nodes[1].Node.Counters.AnswersRepeated);
        t.AdvanceUntil(() => ab.Unanswered != null, 3_000);   // it failed again
        t.Nodes[0].Udp.Deliver(answers[0], b);         // the first answer, late: it completes
        t.Pump();
        Assert.NotNull(ab.Current);
        Assert.Null(ab.Unanswered);
        Assert.Equal(1, t.Send(0, 1));
    }

    /// <summary>The answer is kept for RekeyTimeoutMs: a copy later than that is a replay, dropped.</summary>
    [Fact]
    public void RepeatedHello_AfterRekeyTimeout_IsNotAnswered()
    {
        var (t, hello, answers) = CaughtHello();
        Endpoint a = TestNet.Ep(0);
        t.Nodes[1].Udp.Deliver(hello, a);
        t.Pump();
        Assert.Single(answers);
        t.Advance(Spec.RekeyTimeoutMs);
        int stale = t.Drops(1, DropReason.StaleHello);
        t.Nodes[1].Udp.Deliver(hello, a);
        t.Pump();
        Assert.Single(answers);
        Assert.Equal(stale + 1, t.Drops(1, DropReason.StaleHello));
        Assert.Equal(0, t.Nodes[1].Node.Counters.AnswersRepeated);
    }

    [Fact]
    public void UnderLoad_HelloWithoutCookie_GetsCookieReply_ThenCompletes()
    {
        var t = TestNet.FullMesh(2);
        t.Nodes[1].Node.Admission.ForceUnderLoad = true;
        t.Nodes[0].Tun.Inject(Packets.Udp4("100.64.0.1", "100.64.0.2", 10));
        t.Pump();
        Assert.Empty(t.Nodes[1].Tun.Written);
        Assert.Equal(1, t.Nodes[1].Node.Counters.CookiesSent);
        Assert.Equal(0, t.Nodes[1].Node.Counters.HandshakesCompleted);
        t.Advance(1500);                              // the retransmit carries MAC2
        Assert.Single(t.Nodes[1].Tun.Written);
    }

    [Fact]
    public void CookieReplies_NeverRepeatANonce_AndTheSecretRotates()
    {
        var t = TestNet.FullMesh(2);
        byte[]? hello = null;
        var replies = new List<byte[]>();
        t.Net.Filter = (_, _, d) =>
        {
            if (d[0] == Spec.TlsHandshake && d[5] == Wire.TypeClientHello) hello ??= d;
            if (d[0] == Spec.TlsHandshake && d[5] == Wire.TypeCookieReply) replies.Add(d);
            return false;
        };
        t.Nodes[0].Node.Start(t.NowMs);
        t.Nodes[0].Worker.FlushUdp(t.Nodes[0].Node.UdpOut);
        Assert.NotNull(hello);
        Assert.False(hello.AsSpan(Wire.ClientHelloMac2Offset, Spec.MacLen).ContainsAnyExcept((byte)0));   // no cookie yet
        t.Nodes[1].Node.Admission.ForceUnderLoad = true;
        Endpoint other = Endpoint.FromV4(0xC6336409, 4000);
        void Flood(Endpoint from) { for (int i = 0; i < 3; i++) t.Nodes[1].Udp.Deliver(hello!, from); t.Pump(); }
        Flood(t.Nodes[0].Endpoint);
        Flood(other);
        Assert.Equal(6, replies.Count);
        Assert.Equal(0, t.Nodes[1].Node.Counters.HandshakesCompleted);

        // nonces count up (little-endian) from a random start: none repeats under the life-long key
        var nonces = replies.Select(r => new UInt128(0, BinaryPrimitives.ReadUInt64LittleEndian(r.AsSpan(Wire.CookieReplyNonceOffset))) |
                                         ((UInt128)BinaryPrimitives.ReadUInt32LittleEndian(r.AsSpan(Wire.CookieReplyNonceOffset + 8)) << 64)).ToList();
        for (int i = 1; i < nonces.Count; i++) Assert.Equal(nonces[0] + (UInt128)i, nonces[i]);

        // the initiator opens each; the cookie depends on the source address and on the 2-minute secret
        Peer p = t.Nodes[0].Node.Peers[0];
        byte[] CookieOf(byte[] reply)
        {
            hello.AsSpan(Wire.ClientHelloMac1Offset, Spec.MacLen).CopyTo(p.LastMac1);   // it answers that hello (node 0 may have sent newer ones)
            Assert.True(t.Nodes[0].Node.Handshaker.ConsumeCookieReply(reply, p, t.NowMs)); return p.Cookie.ToArray();
        }
        byte[] first = CookieOf(replies[0]);
        Assert.Equal(first, CookieOf(replies[2]));
        Assert.NotEqual(first, CookieOf(replies[3]));
        t.Advance(Spec.CookieRefreshTimeMs + 1);
        Flood(t.Nodes[0].Endpoint);
        Assert.NotEqual(first, CookieOf(replies[^1]));
        // a hello whose MAC2 carries the current cookie passes: node 1 answers with a ServerHello
        replies.Clear();
        int serverHellos = 0;
        t.Net.Filter = (_, _, d) => { if (d[0] == Spec.TlsHandshake && d[5] == Wire.TypeServerHello) serverHellos++; return true; };
        t.Nodes[0].Tun.Inject(Packets.Udp4("100.64.0.1", "100.64.0.2", 10));
        t.Advance(6000);
        Assert.True(serverHellos >= 1, "the retransmitted hello with its cookie was answered");
        Assert.Single(t.Nodes[1].Tun.Written);
    }

    [Fact]
    public void HelloFlood_CookieRepliesStayWithinBudget_ButAPeerEndpointStillGetsOne()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        Node b = t.Nodes[1].Node;
        byte[] hello = new byte[Wire.ClientHelloLen];
        Peer bAtA = t.Nodes[0].Node.Peers[0];
        t.Nodes[0].Node.Handshaker.CreateClientHello(bAtA, 77, 1_800_000_000_000_000_000L, t.NowMs, hello);
        b.Admission.ForceUnderLoad = true;
        int replies = 0;
        t.Net.Filter = (_, _, d) => { if (d[0] == Spec.TlsHandshake && d[5] == Wire.TypeCookieReply) replies++; return false; };
        int budget = b.Admission.CookieRate;
        for (int i = 0; i < budget + 50; i++)                  // forged sources, all at one instant
        {
            t.Nodes[1].Udp.Deliver(hello, Endpoint.FromV4(0xCB007100u + (uint)(i % 200), (ushort)(1000 + i)));
            if (i % 64 == 63) t.Pump();
        }
        t.Pump();
        Assert.Equal(budget, replies);
        Assert.Equal(50, b.Admission.RefusedCookies);
        t.Nodes[1].Udp.Deliver(hello, t.Nodes[0].Endpoint);   // where peer a was authenticated: still answered
        t.Pump();
        Assert.Equal(budget + 1, replies);
        var view = new StatusView(b, new UpConfig { Mtu = 1420 }, 51820, t.NowMs, () => t.NowMs);
        Assert.Contains("\"cookie_budget\":50", view.Json());
        Assert.Contains("veil_admission_refused_total{reason=\"cookie_budget\"} 50", view.Metrics());
        t.Advance(1000);                                       // the budget refills with time
        t.Nodes[1].Udp.Deliver(hello, Endpoint.FromV4(0xCB0071FFu, 999));
        t.Pump();
        Assert.Equal(budget + 2, replies);
    }

    // A source whose hellos keep going unanswered (the cookie budget spent) is muted for the rest of
    // the second: its hellos, even ones with a bad MAC1, are dropped before any HMAC and counted as
    // rate_source. A peer's endpoint is never muted; a muted source is heard again a second later.
    [Fact]
    public void HelloFlood_UnansweredSourceMuted_PeerEndpointNever()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        Node b = t.Nodes[1].Node;
        byte[] hello = new byte[Wire.ClientHelloLen];
        t.Nodes[0].Node.Handshaker.CreateClientHello(t.Nodes[0].Node.Peers[0], 77, 1_800_000_000_000_000_000L, t.NowMs, hello);
        byte[] junk = (byte[])hello.Clone();
        junk[Wire.ClientHelloMac1Offset] ^= 1;
        b.Admission.ForceUnderLoad = true;
        t.Net.Filter = (_, _, _) => false;
        for (int i = 0; i < b.Admission.CookieRate; i++)                   // spend the budget from elsewhere
            t.Nodes[1].Udp.Deliver(hello, Endpoint.FromV4(0xCB007100u + (uint)(i % 200), (ushort)(1000 + i)));
        t.Pump();
        Endpoint noisy = Endpoint.FromV4(0xCB0072FEu, 4000);
        for (int i = 0; i < 8; i++) t.Nodes[1].Udp.Deliver(hello, noisy);    // 8 go unanswered...
        t.Pump();
        long badMac1 = t.Drops(1, DropReason.BadMac1), muted = b.Admission.RefusedSource;
        t.Nodes[1].Udp.Deliver(junk, noisy);                                // ...so the next is not even checked
        t.Nodes[1].Udp.Deliver(hello, noisy with { Port = 4001 });         // (by address, any port)
        t.Pump();
        Assert.Equal(badMac1, t.Drops(1, DropReason.BadMac1));
        Assert.Equal(muted + 2, b.Admission.RefusedSource);
        // the peer's own endpoint, once its own budget is spent too and 8 more go unanswered, is
        // still checked: a forger cannot mute it
        int replies = 0;
        t.Net.Filter = (_, _, d) => { if (d[0] == Spec.TlsHandshake && d[5] == Wire.TypeCookieReply) replies++; return false; };
        for (int i = 0; i < b.Admission.CookieRate + 8; i++)
        {
            t.Nodes[1].Udp.Deliver(hello, t.Nodes[0].Endpoint);
            if (i % 64 == 63) t.Pump();
        }
        t.Nodes[1].Udp.Deliver(junk, t.Nodes[0].Endpoint);
        t.Pump();
        Assert.Equal(b.Admission.CookieRate, replies);
        Assert.Equal(badMac1 + 1, t.Drops(1, DropReason.BadMac1));
        t.Advance(1000);                                                    // a second later: heard again
        t.Nodes[1].Udp.Deliver(junk, noisy);
        t.Pump();
        Assert.Equal(badMac1 + 2, t.Drops(1, DropReason.BadMac1));
    }

    [Fact]
    public void UdpBatch_TransportRecordsGoBeforeHandshakes()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        t.Advance(Spec.RekeyTimeoutMs);
        Node a = t.Nodes[0].Node;
        a.Admission.ForceUnderLoad = true;
        var batch = new PacketBatch(2, Tune.SlotLen);
        // slot 0: a hello for a without a cookie (earns a cookie reply); slot 1: b asks a for new keys
        t.Nodes[1].Node.Handshaker.CreateClientHello(t.Nodes[1].Node.Peers[0], 5, 1_800_000_000_000_000_000L, t.NowMs, batch.Slot(0));
        batch.Length[0] = Wire.ClientHelloLen;
        batch.Endpoints[0] = t.Nodes[1].Endpoint;
        batch.Length[1] = Record.Seal(t.Nodes[1].Node.Peers[0].Current!, batch.Slot(1), 0, RecordFlags.Keepalive | RecordFlags.Rekey, 1420);
        batch.Endpoints[1] = t.Nodes[1].Endpoint;
        batch.Count = 2;
        a.UdpOut.Count = 0;
        a.ProcessUdpBatch(batch, t.NowMs);
        Assert.Equal(2, a.UdpOut.Count);
        Assert.Equal(Wire.TypeClientHello, a.UdpOut.Packet(0)[5]);   // the transport record's effect came first
        Assert.Equal(Wire.TypeCookieReply, a.UdpOut.Packet(1)[5]);
        Assert.Equal(0, batch.Length[0] + batch.Length[1]);          // neither slot goes to the TUN
    }

    [Fact]
    public void ReplayedClientHello_Ignored()
    {
        var t = TestNet.FullMesh(2);
        byte[]? hello = null;
        t.Net.Filter = (from, _, d) => { if (d[0] == Spec.TlsHandshake && d[5] == 1 && from.Equals(t.Nodes[0].Endpoint)) hello ??= d; return true; };
        t.Nodes[0].Node.Start(t.NowMs);
        t.Nodes[0].Worker.FlushUdp(t.Nodes[0].Node.UdpOut);
        t.Pump();
        Assert.NotNull(hello);
        int sentBefore = t.Nodes[1].Udp.Sent.Count;
        for (int i = 0; i < 3; i++)
        {
            t.Advance(2000);
            t.Nodes[1].Udp.Deliver(hello!, t.Nodes[0].Endpoint);
            t.Pump();
        }
        Assert.Equal(3, Drops(t.Nodes[1], DropReason.StaleHello));
        Assert.Equal(sentBefore, t.Nodes[1].Udp.Sent.Count);    // no ServerHello for a replay
        Assert.Equal(1, t.Send(0, 1));
    }

    [Fact]
    public void ClockWentBackwards_AfterReboot_StillConnects()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        // node 0 reboots with a wall clock an hour in the past
        var cfg = NodeConfigOf(TestNet.FullMesh(2), 0);
        t.Nodes[0].Udp.Dispose();
        t.Nodes[0] = new TestNode(t.Net, t.Nodes[0].Private, cfg, TestNet.Ep(0), "100.64.0.1", 1_700_000_000_000_000_000L - 3_600_000_000_000L);
        // its older hellos are answered once b heard nothing from it for Keepalive + RekeyTimeout
        // (a reboot takes longer than that); node 0 keeps retransmitting until then
        t.Advance(Spec.KeepaliveTimeoutMs + Spec.RekeyTimeoutMs + Tune.StaleHelloIntervalMs + Spec.RekeyTimeoutMs);
        Assert.Equal(1, t.Send(0, 1));
        Assert.Equal(1, t.Send(1, 0));
    }

    // A record with node 1's live receiver index and random ciphertext, from node 0's address.
    private static byte[] ForgedRecord(Session s, ulong counter)
    {
        byte[] forged = new byte[100];
        forged[0] = Spec.TlsApplicationData; forged[1] = 3; forged[2] = 3;
        BinaryPrimitives.WriteUInt16BigEndian(forged.AsSpan(3), 95);
        BinaryPrimitives.WriteUInt32BigEndian(forged.AsSpan(Record.IndexOffset), s.LocalIndex);
        BinaryPrimitives.WriteUInt64BigEndian(forged.AsSpan(Record.CounterOffset), counter);
        return forged;
    }

    private static void Forge(TestNet t, int count, ulong firstCounter)
    {
        Session s = t.Nodes[1].Node.Peers[0].Current!;
        for (int i = 0; i < count; i++) t.Nodes[1].Udp.Deliver(ForgedRecord(s, firstCounter + (ulong)i), t.Nodes[0].Endpoint);
        t.Pump();
    }

    [Fact]
    public void SustainedDecryptFailures_WithoutGoodRecords_StartOneHandshake()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        long before = t.Nodes[1].Node.Counters.HandshakesInitiated;
        Forge(t, Tune.DecryptFailuresBeforeRehandshake, 1000);
        Assert.Equal(before, t.Nodes[1].Node.Counters.HandshakesInitiated);   // a burst proves nothing yet
        t.Advance(Tune.RecoveryQuietMs);
        Forge(t, 1, 2000);
        Assert.Equal(Tune.DecryptFailuresBeforeRehandshake + 1, Drops(t.Nodes[1], DropReason.BadAuth));
        Assert.Equal(before + 1, t.Nodes[1].Node.Counters.HandshakesInitiated);
        Assert.Equal(1, t.Send(0, 1));
    }

    [Fact]
    public void ForgedRecords_BurstOrBesideGoodTraffic_ForceNoHandshake()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        Peer atB = t.Nodes[1].Node.Peers[0];
        Session s = atB.Current!;
        long before = t.Nodes[1].Node.Counters.HandshakesInitiated;
        Forge(t, 40, 1000);                                   // the attack as measured: 40 at once
        for (int round = 0; round < 8; round++)               // then 8 s of forgeries while the peer talks
        {
            Forge(t, 10, 2000 + (ulong)round * 10);
            Assert.Equal(1, t.Send(0, 1));
            t.Advance(1000);
        }
        Assert.Equal(120, Drops(t.Nodes[1], DropReason.BadAuth));
        Assert.Equal(before, t.Nodes[1].Node.Counters.HandshakesInitiated);
        Assert.Same(s, atB.Current);
        Assert.DoesNotContain("session_recovery", t.Nodes[1].LogText.ToString());
    }

    [Fact]
    public void Recovery_UnderEndlessForgery_StartsAtMostOncePerInterval()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        Session s = t.Nodes[1].Node.Peers[0].Current!;
        long before = t.Nodes[1].Node.Counters.HandshakesInitiated;
        for (int second = 0; second < 40; second++)           // 40 s of forgeries and nothing genuine
        {
            Forge(t, 10, 1000 + (ulong)second * 10);
            t.Advance(1000);
        }
        // one recovery (which completes: a new session replaces s); the rest of the flood starts none
        Assert.Equal(before + 1, t.Nodes[1].Node.Counters.HandshakesInitiated);
        Assert.NotSame(s, t.Nodes[1].Node.Peers[0].Current);
        Assert.Equal(1, t.Send(0, 1));
        Assert.Equal(1, t.Send(1, 0));
    }

    [Fact]
    public void ReplayedRecords_Sustained_StartRecoveryLikeBadTags()
    {
        var t = TestNet.FullMesh(2);
        var captured = new List<byte[]>();
        t.Net.Filter = (from, _, d) => { if (d[0] == Spec.TlsApplicationData && from.Equals(t.Nodes[0].Endpoint)) captured.Add(d); return true; };
        t.Start();
        for (int i = 0; i < 4; i++) Assert.Equal(1, t.Send(0, 1));
        t.Net.Filter = null;
        long before = t.Nodes[1].Node.Counters.HandshakesInitiated;
        void Replay() { for (int i = 0; i < 9; i++) foreach (byte[] d in captured) t.Nodes[1].Udp.Deliver(d, t.Nodes[0].Endpoint); t.Pump(); }
        Replay();
        Assert.Equal(before, t.Nodes[1].Node.Counters.HandshakesInitiated);
        t.Advance(Tune.RecoveryQuietMs);
        Replay();
        Assert.True(Drops(t.Nodes[1], DropReason.Replayed) >= Tune.DecryptFailuresBeforeRehandshake);
        Assert.Equal(before + 1, t.Nodes[1].Node.Counters.HandshakesInitiated);
    }

    [Fact]
    public void TooOldRecords_Sustained_StartRecoveryLikeBadTags()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        Session toB = t.Nodes[0].Node.Peers[0].Current!, atB = t.Nodes[1].Node.Peers[0].Current!;
        Assert.Same(toB.Peer.Current, toB);
        byte[] slot = new byte[Tune.SlotLen];
        var old = new List<byte[]>();                          // genuine records, kept back
        for (int i = 0; i < 40; i++) old.Add(slot[..Record.Seal(toB, slot, 0, RecordFlags.Keepalive, 1420)]);
        toB.SendCounter += 10_000;                              // a's counter moves far past them
        Assert.Equal(1, t.Send(0, 1));
        long before = t.Nodes[1].Node.Counters.HandshakesInitiated;
        void Replay() { foreach (byte[] d in old) t.Nodes[1].Udp.Deliver(d, t.Nodes[0].Endpoint); t.Pump(); }
        Replay();
        Assert.Equal(before, t.Nodes[1].Node.Counters.HandshakesInitiated);
        t.Advance(Tune.RecoveryQuietMs);
        Replay();
        Assert.Equal(80, Drops(t.Nodes[1], DropReason.TooOld));
        Assert.Equal(before + 1, t.Nodes[1].Node.Counters.HandshakesInitiated);
        Assert.Same(atB, atB.Peer.Previous ?? atB.Peer.Current);   // the old session stayed until replaced
    }

    [Fact]
    public void OldClientHello_ReplayedManyHandshakesLater_MovesNoEndpoint()
    {
        var t = TestNet.FullMesh(2);
        byte[]? hello = null;
        Endpoint attacker = TestNet.Ep(7);
        int toAttacker = 0, recordsToAttacker = 0;
        t.Net.Filter = (from, to, d) =>
        {
            if (d[0] == Spec.TlsHandshake && d[5] == Wire.TypeClientHello && from.Equals(t.Nodes[0].Endpoint)) hello ??= d;
            if (to.Equals(attacker)) { toAttacker++; if (d[0] == Spec.TlsApplicationData) recordsToAttacker++; }
            return true;
        };
        t.Start();
        Assert.NotNull(hello);
        Peer atB = t.Nodes[1].Node.Peers[0];
        Endpoint real = atB.Endpoint;
        ulong id = BinaryPrimitives.ReadUInt64LittleEndian(hello.AsSpan(Wire.ClientHelloEphemeralOffset));
        // node 0 makes 9 more handshakes, a rekey interval apart, until b no longer remembers the hello
        Peer atA = t.Nodes[0].Node.Peers[0];
        for (int i = 0; i < 9; i++)
        {
            t.Advance(Spec.RekeyAfterTimeMs, 1000);
            t.Nodes[0].Node.StartHandshake(atA, t.NowMs, retransmit: false);
            t.Nodes[0].Worker.FlushUdp(t.Nodes[0].Node.UdpOut);
            t.Pump();
            Assert.Equal(1, t.Send(0, 1));
        }
        Assert.DoesNotContain(id, atB.RecentHelloIds);
        Assert.True(atB.Handshakes >= 10);

        // while the peer is talking, the replay is not answered at all
        long stale = Drops(t.Nodes[1], DropReason.StaleHello);
        t.Nodes[1].Udp.Deliver(hello!, attacker);
        t.Pump();
        Assert.Equal(stale + 1, Drops(t.Nodes[1], DropReason.StaleHello));
        Assert.Equal(0, toAttacker);

        // after a silence it may be answered (a rebooted router looks like this), but nothing moves
        t.Advance(Spec.KeepaliveTimeoutMs + Spec.RekeyTimeoutMs + 1000, 1000);
        Session current = atB.Current!;
        t.Nodes[1].Udp.Deliver(hello!, attacker);
        t.Pump();
        Assert.Equal(real, atB.Endpoint);
        Assert.Same(current, atB.Current);
        for (int i = 0; i < 3; i++) Assert.Equal(1, t.Send(1, 0));
        Assert.Equal(0, recordsToAttacker);
        Assert.True(toAttacker <= 1);                          // at most the one ServerHello
    }

    [Fact]
    public void WithheldClientHello_DuringAGenuineHandshake_DoesNotDisplaceIt()
    {
        var t = TestNet.FullMesh(2);
        byte[]? withheld = null, serverHello = null, genuineHello = null;
        Endpoint attacker = TestNet.Ep(7);
        long start = t.NowMs;
        t.Net.Filter = (from, _, d) =>
        {
            if (d[0] != Spec.TlsHandshake) return true;
            // the attacker keeps the first hello, and its copies are lost until a new hello is made
            if (d[5] == Wire.TypeClientHello && t.NowMs - start < Spec.RekeyTimeoutMs) { withheld ??= d; return false; }
            if (d[5] == Wire.TypeClientHello) genuineHello ??= d;
            if (d[5] == Wire.TypeServerHello && serverHello == null) { serverHello = d; return false; }   // held in flight
            return true;
        };
        t.Nodes[0].Node.Start(t.NowMs);
        t.Nodes[0].Worker.FlushUdp(t.Nodes[0].Node.UdpOut);
        t.Pump();
        Assert.NotNull(withheld);
        t.AdvanceUntil(() => serverHello != null, 10_000);    // the new hello reaches b; b's answer is in flight
        Assert.NotNull(serverHello);
        Peer atB = t.Nodes[1].Node.Peers[0];
        Session genuine = atB.Next!;
        t.Nodes[1].Udp.Deliver(withheld!, attacker);          // the older hello, now
        t.Pump();
        Assert.Same(genuine, atB.Next);
        Assert.Equal(1, Drops(t.Nodes[1], DropReason.StaleHello));
        t.Nodes[1].Udp.Deliver(genuineHello!, attacker);      // a copy of the genuine one: only its answer again
        t.Pump();
        Assert.Same(genuine, atB.Next);
        Assert.Equal(1, t.Nodes[1].Node.Counters.AnswersRepeated);
        t.Nodes[0].Udp.Deliver(serverHello!, t.Nodes[1].Endpoint);
        t.Pump();                                             // a's Bind confirms the genuine session
        Assert.Same(genuine, atB.Current);
        Assert.Equal(0, Drops(t.Nodes[1], DropReason.UnknownIndex));
        Assert.Equal(1, t.Send(0, 1));
        Assert.Equal(1, t.Send(1, 0));
    }

    // A hub with n spokes (overlay 100.64.x.y, underlay 192.0.2.0/24 ports 1..n), only the hub started.
    private static (TestNet Net, TestNode Hub, Key32[] Spokes) Hub(int n, int maxSessions)
    {
        var t = new TestNet();
        var spokes = new Key32[n];
        Key32 hubKey = TestNode.KeyFromSeed(200);
        var hubCfg = new UpConfig { PrivateKey = hubKey, Mtu = 1420, MaxSessions = maxSessions };
        for (int i = 0; i < n; i++)
        {
            byte[] seed = System.Security.Cryptography.SHA256.HashData(BitConverter.GetBytes(i));
            seed.CopyTo(spokes[i]);
            var pc = new PeerConfig { PublicKey = TestNet.PublicOf(spokes[i]) };
            pc.Allowed.Add(IpPrefix.Parse($"100.64.{1 + i / 250}.{1 + i % 250}/32"));
            hubCfg.Peers.Add(pc);
        }
        TestNode hub = t.AddNode(hubKey, hubCfg, TestNet.Ep(0), "100.64.0.1");
        return (t, hub, spokes);
    }

    // Spoke i comes up, makes a handshake with the hub (and sends one packet), and leaves again.
    private static int Visit(TestNet t, TestNode hub, Key32[] spokes, int i, long unixNs)
    {
        var cfg = new UpConfig { PrivateKey = spokes[i], Mtu = 1420 };
        var pc = new PeerConfig { PublicKey = hub.Public, Endpoint = hub.Endpoint };
        pc.Allowed.Add(IpPrefix.Parse("100.64.0.1/32"));
        cfg.Peers.Add(pc);
        TestNode spoke = t.AddNode(spokes[i], cfg, Endpoint.FromV4(0xC0000264, (ushort)(1 + i)), $"100.64.{1 + i / 250}.{1 + i % 250}", unixNs);
        int before = hub.Tun.Written.Count;
        spoke.Tun.Inject(Packets.Udp4(spoke.Overlay, "100.64.0.1", 16));
        t.Pump();
        t.Kill(spoke);
        return hub.Tun.Written.Count - before;
    }

    [Fact]
    public void MaxSessions_CountsPeersNotKeyPairs_AndNeverRefusesAPeerHoldingKeys()
    {
        var (t, hub, spokes) = Hub(4, maxSessions: 2);
        t.StartNode(hub);
        long ns = 1_700_000_000_000_000_000L;
        Assert.Equal(1, Visit(t, hub, spokes, 0, ns));
        Assert.Equal(1, Visit(t, hub, spokes, 1, ns));
        t.Advance(1000);
        Assert.Equal(1, Visit(t, hub, spokes, 0, ns += 10_000_000_000));   // rekeyed: two key pairs
        Assert.Equal(1, Visit(t, hub, spokes, 1, ns));
        Assert.Equal(4, hub.Node.Indexes.SessionCount);
        Assert.Equal(2, hub.Node.PeersHoldingKeys());
        Assert.Equal(0, hub.Node.Admission.RefusedSessions);
        Assert.Equal(0, Visit(t, hub, spokes, 2, ns));                    // a third peer: refused, counted
        Assert.Equal(1, hub.Node.Admission.RefusedSessions);
        Assert.Equal(1, Visit(t, hub, spokes, 1, ns += 10_000_000_000));   // a returning peer: admitted
        Assert.Equal(2, hub.Node.PeersHoldingKeys());
    }

    [Fact]
    public void DefaultMaxSessions_Admits1024PeersEachHoldingTwoKeyPairs()
    {
        var (t, hub, spokes) = Hub(Tune.MaxPeers, Tune.DefaultMaxSessions);
        t.StartNode(hub);
        long ns = 1_700_000_000_000_000_000L;
        int delivered = 0;
        for (int round = 0; round < 2; round++, ns += 10_000_000_000)
            for (int i = 0; i < spokes.Length; i++)
            {
                t.NowMs += 1000 / Tune.DefaultHandshakeRate;      // within --handshake-rate: no cookies
                delivered += Visit(t, hub, spokes, i, ns);
            }
        Assert.Equal(2 * Tune.MaxPeers, delivered);
        Assert.Equal(0, hub.Node.Admission.RefusedSessions);
        Assert.Equal(Tune.MaxPeers, hub.Node.PeersHoldingKeys());
        Assert.Equal(2 * Tune.MaxPeers, hub.Node.Indexes.SessionCount);
    }

    [Fact]
    public void RekeyFlag_FromThePeer_StartsAHandshake_UnlessOurKeysAreFresh()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        Session s = t.Nodes[1].Node.Peers[0].Current!;
        byte[] slot = new byte[Tune.SlotLen];
        void AskForKeys()
        {
            int len = Record.Seal(s, slot, 0, RecordFlags.Keepalive | RecordFlags.Rekey, 1420);
            t.Nodes[0].Udp.Deliver(slot[..len], t.Nodes[1].Endpoint);
            t.Pump();
        }
        long before = t.Nodes[0].Node.Counters.HandshakesInitiated;
        AskForKeys();                                          // keys a moment old: not again so soon
        Assert.Equal(before, t.Nodes[0].Node.Counters.HandshakesInitiated);
        t.Advance(Spec.RekeyTimeoutMs);
        AskForKeys();
        Assert.Equal(before + 1, t.Nodes[0].Node.Counters.HandshakesInitiated);
        Assert.NotSame(s, t.Nodes[1].Node.Peers[0].Current);   // the new keys are in use
        Assert.Equal(1, t.Send(0, 1));
        Assert.Equal(1, t.Send(1, 0));
    }

    [Fact]
    public void PassiveKeepalive_AfterKeepaliveTimeout_WhenOnlyReceiving()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        Assert.Equal(1, t.Send(0, 1));
        int sent = t.Nodes[1].Udp.Sent.Count;
        t.Advance(Spec.KeepaliveTimeoutMs - 200);
        Assert.Equal(sent, t.Nodes[1].Udp.Sent.Count);
        t.Advance(400);
        Assert.Equal(sent + 1, t.Nodes[1].Udp.Sent.Count);
    }

    [Fact]
    public void PersistentKeepalive_SentAtInterval()
    {
        var t = TestNet.FullMesh(2, c => c.PersistentKeepaliveMs = 5000);
        t.Start();
        int sent = t.Nodes[0].Udp.Sent.Count;
        t.Advance(25_000);
        Assert.InRange(t.Nodes[0].Udp.Sent.Count - sent, 4, 6);
    }

    [Fact]
    public void SteadyState_SealRouteOpen_AllocatesNothing()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        Node a = t.Nodes[0].Node, b = t.Nodes[1].Node;
        var outBatch = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        var inBatch = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        byte[] packet = Packets.Udp4("100.64.0.1", "100.64.0.2", 1392);
        var from = t.Nodes[0].Endpoint;
        void RoundTrip()
        {
            outBatch.Count = Tune.BatchSize;
            for (int i = 0; i < Tune.BatchSize; i++)
            {
                packet.CopyTo(outBatch.Slot(i)[Record.PayloadOffset..]);
                outBatch.Offset[i] = Record.PayloadOffset;
                outBatch.Length[i] = packet.Length;
            }
            a.ProcessTunBatch(outBatch, t.NowMs);
            inBatch.Count = Tune.BatchSize;
            for (int i = 0; i < Tune.BatchSize; i++)
            {
                outBatch.Packet(i).CopyTo(inBatch.Slot(i));
                inBatch.Offset[i] = 0;
                inBatch.Length[i] = outBatch.Length[i];
                inBatch.Endpoints[i] = from;
            }
            b.ProcessUdpBatch(inBatch, t.NowMs);
        }
        Allocations.AssertNone(RoundTrip, 100);     // three windows of 6,400 records each way
        Assert.Equal((300 + 20) * 64, b.Counters.TunTxPackets);
    }
}
