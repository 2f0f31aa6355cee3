using System.Net;
using Xunit.Abstractions;
using static Veil.Tests.TestNet;

namespace Veil.Tests;

/// <summary>Paths (§15): a member relays for two members that cannot reach each other, refuses
/// what it should not carry, cannot read or forge what it carries, and punching moves the pair to
/// the direct path once one opens. Node 0 (b) is the public member; 1 (a) and 2 (c) know only b.</summary>
public class RelayTests(ITestOutputHelper output)
{
    private static bool IsAC(in Endpoint x, in Endpoint y) =>
        x.Equals(TestNet.Ep(1)) && y.Equals(TestNet.Ep(2)) || x.Equals(TestNet.Ep(2)) && y.Equals(TestNet.Ep(1));

    /// <summary>Star around b; nothing passes directly between a and c while `cut` says so.</summary>
    private static (TestNet T, TestNode B, TestNode A, TestNode C) Cut(Func<bool> cut, Action<int, UpConfig>? tweak = null)
    {
        var t = TestNet.Mesh(3, i => i == 0 ? [] : [0], tweak);
        t.Net.Filter = (from, to, _) => !(cut() && IsAC(from, to));
        t.Start();
        TestNode b = t.Nodes[0], a = t.Nodes[1], c = t.Nodes[2];
        long ms = t.AdvanceUntil(() => a.Node.FindPeer(c.Public) is { Up: true } && c.Node.FindPeer(a.Public) is { Up: true }, 20_000);
        Assert.True(ms >= 0, "a and c never came up through b");
        return (t, b, a, c);
    }

    // A record of `from`'s session with `to`, flags Relay, carrying payload (as a relay client or a relay would send it).
    private static byte[] RelayRecord(TestNode from, TestNode to, ReadOnlySpan<byte> payload)
    {
        Session s = PeerOf(from, to).Current!;
        byte[] slot = new byte[Tune.SlotLen];
        payload.CopyTo(slot.AsSpan(Record.PayloadOffset));
        int len = Record.Seal(s, slot, payload.Length, RecordFlags.Relay, 1420);
        return slot[..len];
    }

    // An inner data record of a's session with c, carrying one IP packet a -> c.
    private static byte[] InnerData(TestNode a, TestNode c, byte tag)
    {
        Session s = PeerOf(a, c).Current!;
        byte[] packet = Packets.Udp4(a.Overlay, c.Overlay, 64, tag);
        byte[] slot = new byte[Tune.SlotLen];
        packet.CopyTo(slot.AsSpan(Record.PayloadOffset));
        int len = Record.Seal(s, slot, packet.Length, RecordFlags.Data, 1420);
        return slot[..len];
    }

    private static byte[] Cat(params byte[][] parts) => parts.SelectMany(x => x).ToArray();
    private static byte[] B(byte kind) => [kind];
    private static byte[] K(in Key32 key) => ((ReadOnlySpan<byte>)key).ToArray();

    private static void Deliver(TestNet t, TestNode from, TestNode to, byte[] datagram)
    {
        to.Udp.Deliver(datagram, from.Endpoint);
        t.Pump();
    }

    [Fact]
    public void NoDirectPath_PairMeetsThroughRelay_TrafficFlowsBothWays_RelayCounts()
    {
        var (t, b, a, c) = Cut(() => true);
        Peer ac = PeerOf(a, c), ca = PeerOf(c, a);
        Assert.Same(PeerOf(a, b), ac.Relay);
        Assert.Same(PeerOf(c, b), ca.Relay);
        Assert.Equal("relay:n0", ac.PathName);
        long bytes = b.Node.Relays.Bytes;
        for (int i = 0; i < 10; i++)
        {
            Assert.Equal(1, t.Send(1, 2, 200, (byte)i));
            Assert.Equal(1, t.Send(2, 1, 200, (byte)i));
        }
        Assert.True(b.Node.Relays.Bytes - bytes >= 20 * 200, $"relay carried {b.Node.Relays.Bytes - bytes} bytes");
        Assert.Equal(2, b.Node.Relays.Pairs);                   // one flow each way
        Assert.True(ac.RelayedTxBytes > 0 && ac.RelayedRxBytes > 0);
        Assert.Equal(0, b.Node.Relays.Refused);
        Assert.Equal(0, b.Node.Counters.TunTxPackets);           // b delivered none of it to itself
        t.Advance(Tune.FirstPunchMs + 100);
        Assert.True(ac.PunchesSent > 0 && ca.PunchesAnswered > 0, $"punches sent {ac.PunchesSent}, answered {ca.PunchesAnswered}");
    }

    [Fact]
    public void RelayCannotReadForgeOrReplay_InnerRecordsAuthenticateEndToEnd()
    {
        var (t, b, a, c) = Cut(() => true);
        Assert.Equal(1, t.Send(1, 2));
        int written = c.Tun.Written.Count;

        // What a relay delivers, sealed by b around an inner record of a's: c takes it once.
        byte[] inner = InnerData(a, c, 7);
        Deliver(t, b, c, RelayRecord(b, c, Cat(B(Node.RelayDelivered), inner)));
        Assert.Equal(written + 1, c.Tun.Written.Count);
        Assert.Equal(Packets.Udp4(a.Overlay, c.Overlay, 64, 7), c.Tun.Written[^1]);

        // b delivers it again (replay), changes a byte (forgery), or puts a record of its own inside.
        long replayed = c.Node.Counters.Drops[(int)DropReason.Replayed], badAuth = c.Node.Counters.Drops[(int)DropReason.BadAuth];
        long refused = c.Node.Counters.Drops[(int)DropReason.RelayRefused];
        Deliver(t, b, c, RelayRecord(b, c, Cat(B(Node.RelayDelivered), inner)));
        byte[] forged = InnerData(a, c, 8);
        forged[^20] ^= 0x01;
        Deliver(t, b, c, RelayRecord(b, c, Cat(B(Node.RelayDelivered), forged)));
        byte[] own = new byte[Tune.SlotLen];
        Packets.Udp4(b.Overlay, c.Overlay, 64).CopyTo(own.AsSpan(Record.PayloadOffset));
        int ownLen = Record.Seal(PeerOf(b, c).Current!, own, 92, RecordFlags.Data, 1420);
        Deliver(t, b, c, RelayRecord(b, c, Cat(B(Node.RelayDelivered), own[..ownLen])));
        Assert.Equal(written + 1, c.Tun.Written.Count);
        Assert.Equal(replayed + 1, c.Node.Counters.Drops[(int)DropReason.Replayed]);
        Assert.Equal(badAuth + 1, c.Node.Counters.Drops[(int)DropReason.BadAuth]);
        Assert.Equal(refused + 1, c.Node.Counters.Drops[(int)DropReason.RelayRefused]);
        Assert.True(PeerOf(c, a).Up);                            // none of it cost the session
        Assert.Equal(1, t.Send(2, 1));

        // What b forwards it cannot open: the inner datagram it carried for a is a's record for c,
        // which no session of b's authenticates.
        byte[]? carried = null;
        t.Net.Filter = (from, to, d) => { if (from.Equals(a.Endpoint) && to.Equals(b.Endpoint) && d.Length > 200) carried = d; return !IsAC(from, to); };
        Assert.Equal(1, t.Send(1, 2, 300));
        Assert.NotNull(carried);
        Assert.Equal(-1, carried!.AsSpan().IndexOf(Packets.Udp4(a.Overlay, c.Overlay, 300).AsSpan(28, 64)));   // no plaintext on the wire to b
    }

    [Fact]
    public void RelayRefusesWhatItShouldNotCarry_CountsIt_ChangesNothing()
    {
        var (t, b, a, c) = Cut(() => true);
        Assert.Equal(1, t.Send(1, 2));
        Node relay = b.Node;
        Key32 stranger = TestNet.PublicOf(TestNode.KeyFromSeed(99));
        byte[] inner = InnerData(a, c, 1);
        int peers = relay.Peers.Count, routes = relay.RouteList.Count;
        long sentToC = b.Udp.Sent.Count(_ => true);
        int cRx = (int)c.Node.Counters.RxRecords;
        (string Why, byte[] Payload)[] bad =
        [
            ("unknown member", Cat(B(Node.RelayForward), K(stranger), inner)),
            ("to the sender itself", Cat(B(Node.RelayForward), K(a.Public), inner)),
            ("no key", [Node.RelayForward, 1, 2, 3]),
            ("inner not a record", Cat(B(Node.RelayForward), K(c.Public), new byte[40])),
            ("unknown kind", Cat(B(9), K(c.Public), inner)),
            ("empty", []),
            ("delivered garbage to the relay", Cat(B(Node.RelayDelivered), new byte[64])),
        ];
        long refused = relay.Relays.Refused;
        foreach (var (why, payload) in bad)
        {
            long before = relay.Counters.Drops[(int)DropReason.RelayRefused] + relay.Counters.Drops[(int)DropReason.UnknownIndex];
            Deliver(t, a, b, RelayRecord(a, b, payload));
            Assert.True(relay.Counters.Drops[(int)DropReason.RelayRefused] + relay.Counters.Drops[(int)DropReason.UnknownIndex] == before + 1, why);
        }
        Assert.True(relay.Relays.Refused - refused >= 6, $"refused {relay.Relays.Refused - refused}");
        Assert.Equal(cRx, (int)c.Node.Counters.RxRecords);     // nothing reached c
        Assert.Equal(peers, relay.Peers.Count);
        Assert.Equal(routes, relay.RouteList.Count);
        Assert.True(PeerOf(b, a).Up && PeerOf(b, c).Up);

        // Not offered: the same well-formed request is refused, and carried once offered again.
        relay.Relays.Offered = false;
        long notOffered = relay.Relays.Refused;
        Deliver(t, a, b, RelayRecord(a, b, Cat(B(Node.RelayForward), K(c.Public), InnerData(a, c, 2))));
        Assert.Equal(notOffered + 1, relay.Relays.Refused);
        Assert.Equal(cRx, (int)c.Node.Counters.RxRecords);
        relay.Relays.Offered = true;
        int written = c.Tun.Written.Count;
        Deliver(t, a, b, RelayRecord(a, b, Cat(B(Node.RelayForward), K(c.Public), InnerData(a, c, 3))));
        Assert.Equal(written + 1, c.Tun.Written.Count);
        output.WriteLine($"refused {relay.Relays.Refused}, carried {relay.Relays.Records} records");
    }

    // a and c met through b; then c's Close reaches a through b, b stops carrying, and the direct
    // path opens. a's next hello to c goes to b first (nothing came from c directly). told: b tells
    // a it refused it (false: a's Self as an older node's, without flag 16). lost: nothing of a's
    // reaches b, so the hello waits in flight.
    private static (TestNet T, TestNode B, TestNode A, TestNode C, long ReconnectAtMs, long Initiated) RefusedHello(bool told, bool lost = false)
    {
        bool cut = true;
        var (t, b, a, c) = Cut(() => cut);
        byte[] close = new byte[Tune.SlotLen];
        int closeLen = Record.Seal(PeerOf(c, a).Current!, close, 0, RecordFlags.Close, 1420);
        b.Node.Relays.Offered = false;
        cut = false;
        t.Net.Filter = (from, to, _) =>
        {
            PeerOf(b, a).HearsRefusals &= told;
            return !(lost && from.Equals(a.Endpoint) && to.Equals(b.Endpoint));
        };
        long initiated = a.Node.Counters.HandshakesInitiated;
        Deliver(t, b, a, RelayRecord(b, a, Cat(B(Node.RelayDelivered), close[..closeLen])));
        Peer ac = PeerOf(a, c);
        Assert.False(ac.Up);
        Assert.Same(PeerOf(a, b), ac.Relay);
        Assert.True(ac.ReconnectAtMs > t.NowMs);
        return (t, b, a, c, ac.ReconnectAtMs, initiated);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void RefusedHello_IsToldToItsSender_WhichSendsItDirectAtOnce(bool told)
    {
        var (t, b, a, c, helloAtMs, initiated) = RefusedHello(told);
        Peer ac = PeerOf(a, c);
        long repeated = a.Node.Counters.HellosRepeated, refused = b.Node.Relays.Refused;
        Assert.True(t.AdvanceUntil(() => ac.Up, 10_000) >= 0, "a and c never came up");
        long ms = t.NowMs - helloAtMs;
        output.WriteLine($"told={told}: up {ms} ms after the hello was due; told {b.Node.Relays.RefusalsTold}, heard {a.Node.Relays.RefusalsHeard}");
        Assert.True(b.Node.Relays.Refused > refused);             // the hello went to b first
        Assert.Null(ac.Relay);
        Assert.Equal(c.Endpoint, ac.Endpoint);
        Assert.Equal(initiated + 1, a.Node.Counters.HandshakesInitiated);     // the same hello went again, direct
        Assert.Equal(repeated + 1, a.Node.Counters.HellosRepeated);
        Assert.Equal(told ? 1 : 0, b.Node.Relays.RefusalsTold);
        Assert.Equal(told ? 1 : 0, a.Node.Relays.RefusalsHeard);
        if (told) Assert.True(ms < Spec.FirstRetransmitMs, $"{ms} ms");
        else Assert.True(ms >= Spec.FirstRetransmitMs, $"{ms} ms");
        Assert.Equal(1, t.Send(1, 2));
    }

    [Fact]
    public void RefusedNotice_IsExactlyTypeAndKey_AndMovesOnlyAHelloInFlightThroughThatRelay()
    {
        var (t, b, a, c, _, initiated) = RefusedHello(told: true, lost: true);
        Assert.True(t.AdvanceUntil(() => a.Node.Counters.HandshakesInitiated > initiated, 5_000) >= 0, "a never said hello again");
        Peer ac = PeerOf(a, c), ab = PeerOf(a, b);
        Handshake pending = ac.Pending!;
        Assert.Same(ab, ac.Relay);

        // What b sends: 03 ‖ c's key, sealed in b's session with a as a Relay record.
        byte[] notice = Cat(B(Node.RelayRefused), K(c.Public));
        Assert.Equal(33, notice.Length);
        Assert.Equal(3, Node.RelayRefused);
        long malformed = a.Node.Counters.Drops[(int)DropReason.RelayRefused];

        // Not moved: a notice naming a member whose hello does not go through b (b itself), and
        // notices one byte longer or shorter (malformed, counted).
        Deliver(t, b, a, RelayRecord(b, a, Cat(B(Node.RelayRefused), K(b.Public))));
        Deliver(t, b, a, RelayRecord(b, a, Cat(notice, B(0))));
        Deliver(t, b, a, RelayRecord(b, a, notice[..32]));
        Assert.Equal(malformed + 2, a.Node.Counters.Drops[(int)DropReason.RelayRefused]);
        Assert.Same(ab, ac.Relay);
        Assert.Same(pending, ac.Pending);
        Assert.Equal(0, a.Node.Relays.RefusalsHeard);

        // From b, about c: the same hello goes straight to c (lost there this time), once: a second
        // notice finds it no longer on b's path.
        bool toC = false;
        t.Net.Filter = (from, to, _) => toC || !from.Equals(a.Endpoint);
        long repeated = a.Node.Counters.HellosRepeated;
        Deliver(t, b, a, RelayRecord(b, a, notice));
        Assert.Equal(1, a.Node.Relays.RefusalsHeard);
        Assert.Equal(repeated + 1, a.Node.Counters.HellosRepeated);
        Assert.Null(ac.Relay);
        Assert.Same(pending, ac.Pending);
        Deliver(t, b, a, RelayRecord(b, a, notice));
        Assert.Equal(1, a.Node.Relays.RefusalsHeard);
        Assert.Equal(repeated + 1, a.Node.Counters.HellosRepeated);
        toC = true;
        Assert.True(t.AdvanceUntil(() => ac.Up, 5_000) >= 0, "a and c never came up");
        Assert.Null(ac.Relay);
    }

    [Fact]
    public void RefusedNotice_DoesNotMoveAPairThatIsUpThroughTheRelay()
    {
        var (t, b, a, c) = Cut(() => true);
        Peer ac = PeerOf(a, c);
        t.Net.Filter = (from, to, _) => !IsAC(from, to) && !(from.Equals(a.Endpoint) && to.Equals(b.Endpoint));
        a.Node.StartHandshake(ac, t.NowMs, retransmit: false);   // a rekey, through b
        a.Worker.FlushUdp(a.Node.UdpOut);
        Assert.NotNull(ac.Pending);
        long repeated = a.Node.Counters.HellosRepeated;
        Deliver(t, b, a, RelayRecord(b, a, Cat(B(Node.RelayRefused), K(c.Public))));
        Assert.Same(PeerOf(a, b), ac.Relay);                     // direct does not work here: it stays on b
        Assert.True(ac.Up);
        Assert.Equal(0, a.Node.Relays.RefusalsHeard);
        Assert.Equal(repeated, a.Node.Counters.HellosRepeated);
    }

    [Fact]
    public void RelayRate_CapsEachDirection_CountsTheExcess_RefillsWithTime()
    {
        var (t, b, a, c) = Cut(() => true);
        b.Node.Relays.RateBytesPerS = 4_000;                   // ~13 records of 300 bytes a second
        t.Advance(2_000);                                       // the buckets fill to the new rate
        int got = 0;
        for (int i = 0; i < 40; i++) got += t.Send(1, 2, 300);
        output.WriteLine($"{got} of 40 delivered; rate-limited {b.Node.Relays.RateLimited}");
        Assert.InRange(got, 5, 20);
        Assert.True(b.Node.Relays.RateLimited >= 20);
        Assert.Equal(b.Node.Relays.RateLimited, b.Node.Counters.Drops[(int)DropReason.RelayRate]);
        Assert.Equal(1, t.Send(2, 1, 300));                     // the other direction has its own budget
        t.Advance(1_000);
        Assert.Equal(1, t.Send(1, 2, 300));
        Assert.True(PeerOf(a, c).Up);
    }

    [Fact]
    public void DirectPathOpens_PunchMovesPairOffTheRelay_AndBackWhenItDies()
    {
        bool cut = true;
        var (t, b, a, c) = Cut(() => cut);
        Peer ac = PeerOf(a, c), ca = PeerOf(c, a);
        Assert.NotNull(ac.Relay);
        cut = false;
        long ms = t.AdvanceUntil(() => ac.Relay == null && ca.Relay == null, 120_000);
        output.WriteLine($"direct {ms} ms after the path opened; punches a {ac.PunchesSent} c {ca.PunchesSent}");
        Assert.True(ms >= 0, "never moved to the direct path");
        Assert.Equal(c.Endpoint, ac.Endpoint);
        long carried = b.Node.Relays.Records;
        Assert.Equal(1, t.Send(1, 2));
        Assert.Equal(1, t.Send(2, 1));
        Assert.Equal(carried, b.Node.Relays.Records);           // b carries none of it now

        cut = true;                                              // the direct path dies: back to the relay
        ms = t.AdvanceUntil(() => ac.Up && ac.Relay != null && ca.Up && ca.Relay != null && t.Send(1, 2) == 1, 30_000);
        output.WriteLine($"relayed again {ms} ms after the direct path died");
        Assert.True(ms >= 0, "never fell back to the relay");
        Assert.Equal(1, t.Send(2, 1));
    }

    [Fact]
    public void VeilPing_ShowsThePath_DirectOrRelay_AndRefusesAPeerWithoutSession()
    {
        bool cut = true;
        var (t, b, a, c) = Cut(() => cut);
        var answers = new List<string>();
        a.Node.Ping(PeerOf(a, c), t.NowMs, answers.Add);
        a.Node.Ping(PeerOf(a, b), t.NowMs, answers.Add);
        t.Pump();
        Assert.Equal(2, answers.Count);
        Assert.Matches(@"^pong from n2 path=relay:n0 endpoint=192\.0\.2\.1:51820 time=\d+\.\d\d ms\n$", answers.Find(x => x.Contains("n2")));
        Assert.Matches(@"^pong from n0 path=direct endpoint=192\.0\.2\.1:51820 time=", answers.Find(x => x.Contains("n0")));
        cut = false;
        Assert.True(t.AdvanceUntil(() => PeerOf(a, c).Relay == null && PeerOf(c, a).Relay == null, 60_000) >= 0);
        answers.Clear();
        a.Node.Ping(PeerOf(a, c), t.NowMs, answers.Add);
        t.Pump();
        Assert.StartsWith("pong from n2 path=direct endpoint=192.0.2.3:51820 ", Assert.Single(answers));

        // A Pong nobody asked for changes nothing; a peer without a session is an error at once.
        answers.Clear();
        t.Kill(c);
        t.Advance(Spec.RejectAfterTimeMs + 10_000, 1000);   // its session expired too
        Assert.False(PeerOf(a, c).Up);
        Console.WriteLine($"DBG after close relay={PeerOf(a, c).Relay?.Name} reconnect={PeerOf(a, c).ReconnectAtMs - t.NowMs} hu={PeerOf(a, c).HelloUnanswered} offers={PeerOf(a, b).OffersRelay}");
        a.Node.Ping(PeerOf(a, c), t.NowMs, answers.Add);
        Assert.StartsWith("error: n2 has no session now", Assert.Single(answers));
        a.Node.Ponged(PeerOf(a, b), 12345);
        Assert.Single(answers);
    }

    [Fact]
    public void Netcheck_TellsWhetherTheMappingVariesByMember()
    {
        var t = TestNet.Mesh(3, i => i == 0 ? [] : [0]);
        t.Start();
        t.Advance(3_000);
        TestNode a = t.Nodes[0];
        var view = new StatusView(a.Node, new UpConfig(), 51820, t.NowMs, () => t.NowMs);
        string text = view.Netcheck();
        Assert.Contains("n1 sees 192.0.2.1:51820", text);
        Assert.Contains("n2 sees 192.0.2.1:51820", text);
        Assert.Contains("mapping: the same for every member", text);
        Assert.Contains("port mapping: off", text);
        Assert.Contains("relay: offered, 20 Mbit/s per pair", text);
        Assert.Contains("  n1: direct 192.0.2.2:51820", text);
        PeerOf(a, t.Nodes[2]).SeesUsAt = Endpoint.FromIp(IPAddress.Parse("192.0.2.1"), 40000);   // a NAT that maps per destination
        Assert.Contains("mapping: varies by destination (symmetric NAT)", view.Netcheck());
        PeerOf(a, t.Nodes[2]).SeesUsAt = default;
        Assert.Contains("mapping: unknown", view.Netcheck());
    }

    [Fact]
    public void UpgradeToDirect_LosesNothingInFlight()
    {
        bool cut = true;
        var (t, b, a, c) = Cut(() => cut);
        Peer ac = PeerOf(a, c);
        t.UseLatency(20);                                        // datagrams in flight on both paths at the switch
        cut = false;
        int sent = 0, got = 0;
        long start = t.NowMs;
        while (ac.Relay != null || t.NowMs - start < 10_000)
        {
            c.Tun.Written.Clear();
            a.Tun.Inject(Packets.Udp4(a.Overlay, c.Overlay, 100, (byte)sent));
            sent++;
            t.Advance(10, 10);
            got += c.Tun.Written.Count;
            Assert.True(t.NowMs - start < 120_000, "never moved to the direct path");
        }
        c.Tun.Written.Clear();
        t.Advance(200, 10);
        got += c.Tun.Written.Count;
        Assert.Null(ac.Relay);
        Assert.Equal(sent, got);
    }

    [Fact]
    public void NoRelay_PairThatCannotMeetDirectlyStaysDown()
    {
        var t = TestNet.Mesh(3, i => i == 0 ? [] : [0], (i, c) => { if (i == 0) c.Relay = false; });
        t.Net.Filter = (from, to, _) => !IsAC(from, to);
        t.Start();
        t.Advance(20_000, 250);
        TestNode b = t.Nodes[0], a = t.Nodes[1], c = t.Nodes[2];
        Assert.True(PeerOf(a, b).Up && PeerOf(c, b).Up);
        Assert.False(PeerOf(a, c).Up);
        Console.WriteLine($"DBG after close relay={PeerOf(a, c).Relay?.Name} reconnect={PeerOf(a, c).ReconnectAtMs - t.NowMs} hu={PeerOf(a, c).HelloUnanswered} offers={PeerOf(a, b).OffersRelay}");
        Assert.Null(PeerOf(a, c).Relay);
        Assert.Equal(0, b.Node.Relays.Records);
        Assert.Equal(0, b.Node.Relays.Refused);                 // it offers nothing, so nobody asks
    }

    [Fact]
    public void RelayedSteadyState_AllocatesNothing_AtSenderRelayOrReceiver()
    {
        var (t, b, a, c) = Cut(() => true, (i, cfg) => { if (i == 0) cfg.RelayRateMbit = 100_000; });
        Node na = a.Node, nb = b.Node, nc = c.Node;
        var tunBatch = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        var udpBatch = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        byte[] packet = Packets.Udp4(a.Overlay, c.Overlay, 1200);
        int delivered = 0;
        // Moves what `from` queued in its UdpOut into `to` as one received batch.
        void Hop(Node from, Endpoint fromEp, Node to)
        {
            udpBatch.Count = from.UdpOut.Count;
            for (int i = 0; i < from.UdpOut.Count; i++)
            {
                from.UdpOut.Packet(i).CopyTo(udpBatch.Slot(i));
                udpBatch.Offset[i] = 0;
                udpBatch.Length[i] = from.UdpOut.Length[i];
                udpBatch.Endpoints[i] = fromEp;
            }
            from.UdpOut.Count = 0;
            to.ProcessUdpBatch(udpBatch, t.NowMs);
        }
        void RoundTrip()
        {
            t.NowMs++;                                           // the relay's budget refills (12.5 MB per ms)
            tunBatch.Count = 16;
            for (int i = 0; i < 16; i++)
            {
                packet.CopyTo(tunBatch.Slot(i)[Record.PayloadOffset..]);
                tunBatch.Offset[i] = Record.PayloadOffset;
                tunBatch.Length[i] = packet.Length;
            }
            na.ProcessTunBatch(tunBatch, t.NowMs);
            Hop(na, a.Endpoint, nb);
            Hop(nb, b.Endpoint, nc);
            delivered = (int)nc.Counters.TunTxPackets;
        }
        lock (na.Gate) lock (nb.Gate) lock (nc.Gate)
        {
            na.UdpOut.Count = nb.UdpOut.Count = nc.UdpOut.Count = 0;
            Allocations.AssertNone(RoundTrip, 50);
        }
        Assert.True(delivered >= (20 + 150) * 16, $"c wrote {delivered} packets");
    }
}

/// <summary>The state file (--state): what a node remembers of the members it learned, and a restart
/// that finds them again while the member it was configured with is down.</summary>
public class MemberStateTests
{
    [Fact]
    public void Restart_WithBootstrapDown_FindsTheMeshFromTheStateFile()
    {
        var t = TestNet.Mesh(3, i => i == 0 ? [] : [0]);
        t.Start();
        t.Advance(3_000);
        TestNode b = t.Nodes[0], a = t.Nodes[1], c = t.Nodes[2];
        Assert.True(PeerOf(a, c).Up);
        string state = a.Node.StateText();
        Assert.Contains(Node.StateHeader + "\n", state);
        Assert.Contains($"member {c.Public.ToBase64()} n2 192.0.2.3:51820", state);
        Assert.DoesNotContain(b.Public.ToBase64(), state);              // a configured peer: the config has it

        // a restarts (a new node with a's key and config) while b is down: only the state file knows c.
        t.Kill(a);
        t.Kill(b);
        var again = t.AddNode(a.Private, TestNet.MeshConfig(1, t.Keys, [0]), TestNet.Ep(1), "100.64.0.2");
        again.Node.Start(t.NowMs);
        Assert.Null(again.Node.LoadState(state, t.NowMs, out int restored));
        Assert.Equal(1, restored);
        Peer ac = again.Node.FindPeer(c.Public)!;
        Assert.True(ac.Remembered && ac.Learned);
        Assert.Equal("n2", ac.Name);
        long ms = t.AdvanceUntil(() => ac.Up, 30_000);
        Assert.True(ms >= 0, "never reached c from the state file");
        t.Advance(Tune.ExchangeDebounceMs + 100);                 // c's claims (its routes) come with its Self
        Assert.Equal(1, t.Send(t.Nodes.IndexOf(again), t.Nodes.IndexOf(c)));
        Assert.False(ac.Remembered);
    }

    [Fact]
    public void RememberedMembers_AreKept_WhileNothingIsUp()
    {
        var t = TestNet.Mesh(1, _ => []);
        t.Start();
        Node n = t.Nodes[0].Node;
        Key32 other = TestNet.PublicOf(TestNode.KeyFromSeed(50));
        Assert.Null(n.LoadState($"{Node.StateHeader}\nmember {other.ToBase64()} far 192.0.2.99:51820,[2001:db8::9]:51820\n", t.NowMs, out int restored));
        Assert.Equal(1, restored);
        Peer p = n.FindPeer(other)!;
        Assert.Equal(2, p.Candidates.Count);
        t.Advance(Tune.ForgetMemberAfterMs + 60_000, 5_000);        // nobody answers, and nobody else is up
        Assert.Same(p, n.FindPeer(other));
        Assert.True(p.HellosSent > 1, "it keeps trying");
    }

    [Theory]
    [InlineData("member KEY n 192.0.2.1:1\n", "expected 'veil-state 1'")]                  // no header
    [InlineData("veil-state 1\nmember KEY n\n", "expected 'member KEY NAME ENDPOINTS'")]
    [InlineData("veil-state 1\nmember notakey n 192.0.2.1:1\n", "expected 'member KEY NAME ENDPOINTS'")]
    [InlineData("veil-state 1\nmember KEY a/b 192.0.2.1:1\n", "bad name")]
    [InlineData("veil-state 1\nmember KEY n 192.0.2.1\n", "bad endpoint")]
    [InlineData("veil-state 1\nmember KEY n example.com:1\n", "bad endpoint")]
    [InlineData("veil-state 1\nmember KEY n [100::1]:1\n", "bad endpoint")]           // a TCP link's stand-in
    [InlineData("veil-state 1\nmember KEY n 192.0.2.1:1,192.0.2.1:2,192.0.2.1:3,192.0.2.1:4,192.0.2.1:5\n", "bad endpoint")]
    [InlineData("veil-state 2\n", "expected 'veil-state 1'")]
    public void BadStateFile_IsRefusedWhole_NothingApplied(string text, string why)
    {
        var t = TestNet.Mesh(1, _ => []);
        t.Start();
        Node n = t.Nodes[0].Node;
        Key32 good = TestNet.PublicOf(TestNode.KeyFromSeed(60)), key = TestNet.PublicOf(TestNode.KeyFromSeed(61));
        string file = $"# comment\n{Node.StateHeader}\nmember {good.ToBase64()} fine 192.0.2.98:51820\n".Replace(Node.StateHeader + "\n", "") + text.Replace("KEY", key.ToBase64());
        file = text.StartsWith("veil-state") ? $"# comment\n{text.Replace("KEY", key.ToBase64())}member {good.ToBase64()} fine 192.0.2.98:51820\n" : file;
        string? error = n.LoadState(file, t.NowMs, out int restored);
        Assert.NotNull(error);
        Assert.Contains(why, error);
        Assert.Equal(0, restored);
        Assert.Null(n.FindPeer(good));
        Assert.Null(n.FindPeer(key));
    }

    [Fact]
    public void WriteAtomically_ReplacesTheFileAtomically_Mode0600()
    {
        string dir = Directory.CreateTempSubdirectory("veil-state-").FullName;
        try
        {
            string path = Path.Combine(dir, "state");
            var log = new Log(new StringWriter(), LogLevel.Info);
            Daemon.WriteAtomically(path, "veil-state 1\n", log, "state_not_saved");
            Daemon.WriteAtomically(path, "veil-state 1\nmember x\n", log, "state_not_saved");
            Assert.Equal("veil-state 1\nmember x\n", File.ReadAllText(path));
            Assert.Equal(UnixFileMode.UserRead | UnixFileMode.UserWrite, File.GetUnixFileMode(path));
            Assert.Equal(["state"], Directory.GetFiles(dir).Select(Path.GetFileName));
        }
        finally { Directory.Delete(dir, true); }
    }
}

/// <summary>Beacons (--beacon-store, --beacon-load): sealed with the network secret, checked whole.</summary>
public class BeaconTests
{
    private static readonly byte[] Key = Beacon.KeyOf(TestNet.MeshPsk()), OtherKey = Beacon.KeyOf(TestNet.MeshPsk(0x5A));
    private static readonly Key32 Member = TestNet.PublicOf(TestNode.KeyFromSeed(70));
    private static readonly List<Endpoint> Eps = [Endpoint.FromIp(IPAddress.Parse("192.0.2.2"), 51820), Endpoint.FromIp(IPAddress.Parse("2001:db8::2"), 51820)];
    private const long Now = 1_800_000_000;

    [Fact]
    public void SealedBeacon_OpensUnderTheSecret_WithKeyAndEndpoints()
    {
        string line = Beacon.Seal(Key, Member, Now - 60, Eps);
        Assert.StartsWith(Beacon.Prefix, line);
        Assert.DoesNotContain("192.0.2.2", line);
        var got = new List<Endpoint>();
        Assert.Null(Beacon.TryOpen(line + "\n", [OtherKey, Key], Now, out Key32 key, got));   // any secret held (a rotation)
        Assert.True(key.EqualsCt(Member));
        Assert.Equal(Eps, got);
        Assert.NotEqual(line, Beacon.Seal(Key, Member, Now - 60, Eps));               // a fresh nonce each time
    }

    [Fact]
    public void ForeignStaleFutureTamperedOrMalformed_AreIgnored()
    {
        var got = new List<Endpoint>();
        string line = Beacon.Seal(Key, Member, Now, Eps);
        Assert.Equal("does not open under the network secret", Beacon.TryOpen(line, [OtherKey], Now, out _, got));
        Assert.Equal("stale", Beacon.TryOpen(Beacon.Seal(Key, Member, Now - Beacon.MaxAgeS - 1, Eps), [Key], Now, out _, got));
        Assert.Equal("from the future", Beacon.TryOpen(Beacon.Seal(Key, Member, Now + Beacon.MaxSkewS + 1, Eps), [Key], Now, out _, got));
        char[] c = line.ToCharArray();
        c[Beacon.Prefix.Length + 20] = c[Beacon.Prefix.Length + 20] == 'A' ? 'B' : 'A';
        Assert.Equal("does not open under the network secret", Beacon.TryOpen(new string(c), [Key], Now, out _, got));
        Assert.Equal("not a beacon", Beacon.TryOpen("hello", [Key], Now, out _, got));
        Assert.Equal("malformed", Beacon.TryOpen(Beacon.Prefix + "!!!", [Key], Now, out _, got));
        Assert.Equal("malformed", Beacon.TryOpen(Beacon.Prefix + Convert.ToBase64String(new byte[20]), [Key], Now, out _, got));
        Assert.Equal("malformed", Beacon.TryOpen(Beacon.Seal(Key, Member, Now, []), [Key], Now, out _, got));   // no endpoint
        Assert.Empty(got);
    }

    [Fact]
    public void Command_RunsWithoutShell_BoundedInTime()
    {
        string? out1 = Beacon.Run("|/bin/cat", "line one\n", 5_000, out string? error);
        Assert.Null(error);
        Assert.Equal("line one\n", out1);
        Assert.Equal("$HOME;x\n", Beacon.Run("|/bin/echo $HOME;x", null, 5_000, out _));          // no shell: nothing expands
        Assert.Null(Beacon.Run("|/bin/sleep 5", null, 200, out error));
        Assert.Equal("timed out after 200 ms", error);
        Assert.Null(Beacon.Run("|/bin/false", null, 5_000, out error));
        Assert.Equal("exit status 1", error);
        Assert.Null(Beacon.Run("|/nonexistent/program", null, 5_000, out error));
        Assert.NotNull(error);
    }

    [Fact]
    public void ABeaconMember_IsRemembered_AndReached()
    {
        var t = TestNet.Mesh(2, _ => []);                        // two members that know nothing of each other
        t.Start();
        TestNode a = t.Nodes[0], c = t.Nodes[1];
        Assert.Null(a.Node.FindPeer(c.Public));
        Assert.True(a.Node.Remember(c.Public, null, [c.Endpoint], t.NowMs));
        Assert.False(a.Node.Remember(a.Public, null, [a.Endpoint], t.NowMs));          // our own beacon
        Assert.True(t.AdvanceUntil(() => a.Node.FindPeer(c.Public) is { Up: true }, 10_000) >= 0);
    }
}
