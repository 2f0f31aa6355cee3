using System.Buffers.Binary;
using Xunit;

namespace Veil.Tests;

/// <summary>Parity records (§12.1): the arithmetic against the README's formula, the wire bytes, and
/// the whole path through two nodes with crafted loss patterns, forged and replayed parity.</summary>
public class FecTests
{
    // ---- GF(2^8) and the rows, from the README's definition ----

    // Multiplication the slow way: shift and add, reducing by x^8+x^4+x^3+x^2+1.
    private static byte GfMul(byte a, byte b)
    {
        int p = 0, x = a;
        for (int y = b; y != 0; y >>= 1, x = (x << 1) ^ ((x & 0x80) != 0 ? 0x11D : 0))
            if ((y & 1) != 0) p ^= x;
        return (byte)p;
    }

    private static byte GfPow2(int e)
    {
        byte r = 1;
        for (int i = 0; i < e; i++) r = GfMul(r, 2);
        return r;
    }

    // Row r over the members (oldest first): Σ g^(r·e)·D, e = members newer than D, D zero-extended.
    private static byte[] DocRow(int r, List<byte[]> members)
    {
        byte[] row = new byte[members.Max(m => m.Length)];
        for (int j = 0; j < members.Count; j++)
        {
            byte c = GfPow2(r * (members.Count - 1 - j));
            for (int i = 0; i < members[j].Length; i++) row[i] ^= GfMul(c, members[j][i]);
        }
        return row;
    }

    [Fact]
    public void Field_MatchesTheSlowMultiplication()
    {
        Assert.Equal(0x1D, Fec.Pow2(8));                     // x^8 = x^4 + x^3 + x^2 + 1
        for (int a = 0; a < 256; a++)
        {
            for (int b = 0; b < 256; b += 7) Assert.Equal(GfMul((byte)a, (byte)b), Fec.Mul((byte)a, (byte)b));
            if (a > 0) Assert.Equal(1, Fec.Mul((byte)a, Fec.Inverse((byte)a)));
        }
        var seen = new HashSet<byte>();
        for (int e = 0; e < 255; e++) Assert.True(seen.Add(Fec.Pow2(e)));   // g = 2 generates every nonzero element
    }

    [Fact]
    public void MulPow2Xor_IsOneHornerStepOfTheRow()
    {
        var rng = new Random(7);
        foreach (int len in new[] { 1, 15, 16, 31, 32, 33, 100, 1420 })
            for (int times = 0; times <= 3; times++)
            {
                byte[] acc = new byte[len], d = new byte[rng.Next(1, len + 1)];
                rng.NextBytes(acc);
                rng.NextBytes(d);
                byte[] want = acc.Select((v, i) => (byte)(GfMul(v, GfPow2(times)) ^ (i < d.Length ? d[i] : 0))).ToArray();
                Fec.MulPow2Xor(acc, d, times);
                Assert.Equal(want, acc);
            }
    }

    // ---- wire bytes ----

    [Fact]
    public void ParityPayload_IsTheDocumentedLayout()
    {
        var t = TwoNodes();
        Session s = TestNet.PeerOf(t.Nodes[0], t.Nodes[1]).Current!;
        var f = new FecSender(1420) { Rows = 4, Want = 3 };
        byte[][] members = [[0x45, 1, 2, 3], [0x45, 0xff], [0x60, 9, 8, 7, 6, 5]];
        ulong[] counters = [100, 101, 104];                  // a keepalive and a control record between them
        for (int j = 0; j < 3; j++) f.Add(s, counters[j], members[j], 0);
        byte[] slot = new byte[2048];
        for (int r = 0; r < 4; r++)
        {
            int n = f.Write(slot, r, 105 + (ulong)r);     // sealed right after the newest member
            byte[] m = slot.AsSpan(Record.PayloadOffset, n).ToArray();
            Assert.Equal(10 + 6, n);
            Assert.Equal(r, m[0]);
            Assert.Equal(r + 1, m[1]);
            Assert.Equal(0b11001UL, BinaryPrimitives.ReadUInt64BigEndian(m.AsSpan(2)));   // newest 104; 101 and 100 behind it
            Assert.Equal(DocRow(r, [.. members]), m[10..]);
        }
        // pinned (computed apart from the code): row 0 is the XOR, row 1 weights the oldest by g^2, the middle one by g
        f.Write(slot, 0, 105);
        Assert.Equal("00010000000000000019" + "60f70a040605", Convert.ToHexString(slot, Record.PayloadOffset, 16).ToLowerInvariant());
        f.Write(slot, 1, 106);
        Assert.Equal("01020000000000000019" + "e3ee000b0605", Convert.ToHexString(slot, Record.PayloadOffset, 16).ToLowerInvariant());
        f.Write(slot, 3, 108);
        Assert.Equal("03040000000000000019" + "e2e288c70605", Convert.ToHexString(slot, Record.PayloadOffset, 16).ToLowerInvariant());
        f.Write(slot, 0, 111);                                // six records after the newest: back 7
        Assert.Equal("0007", Convert.ToHexString(slot, Record.PayloadOffset, 2));
    }

    [Fact]
    public void LossMessage_IsTypeThenPartsPerTenThousand()
    {
        byte[] m = new byte[8];
        Assert.Equal(3, ExchangeMessage.WriteLoss(m, 200));
        Assert.Equal("0800c8", Convert.ToHexString(m, 0, 3).ToLowerInvariant());
        var parsed = new ExchangeMessage();
        Assert.True(parsed.Parse(m.AsSpan(0, 3)));
        Assert.Equal(200, parsed.LossBp);
        Assert.False(parsed.Parse([8, 0x27, 0x11]));          // 10,001: more than everything
        Assert.False(parsed.Parse([8, 0, 1, 0]));             // not consumed exactly
        Assert.False(parsed.Parse([8, 0]));
    }

    [Theory]
    [InlineData(0, 0, 0)]
    [InlineData(10, 32, 1)]
    [InlineData(50, 40, 2)]
    [InlineData(100, 40, 3)]
    [InlineData(200, 40, 4)]
    [InlineData(500, 16, 4)]
    [InlineData(10_000, 8, 4)]
    public void Size_FollowsTheReportedLoss(int bp, int members, int rows) => Assert.Equal((members, rows), Fec.Size(bp));

    // ---- through two nodes ----

    // Two nodes with a session; b has seen a first group of parity (its ring exists from then on, or
    // from its first loss report).
    private static TestNet TwoNodes()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        Assert.Equal(1, t.Send(0, 1));
        Deliver(t, Burst(t, 40, 200, firstLen: 40));
        Assert.NotNull(TestNet.PeerOf(t.Nodes[1], t.Nodes[0]).FecIn);
        t.Nodes[1].Node.FecParityReceived = 0;
        t.Nodes[1].Node.FecUnrecoverable = 0;                 // the first group found its members not kept
        return t;
    }

    // a reads n packets (lengths 100 + i) in one TUN batch while b reports lossBp; returns what a sent,
    // in order (the data records, then the group's parity).
    private static List<byte[]> Burst(TestNet t, int n, int lossBp, int firstLen = 100)
    {
        TestNode a = t.Nodes[0], b = t.Nodes[1];
        a.Node.LossReported(TestNet.PeerOf(a, b), lossBp, t.NowMs);
        var sent = new List<byte[]>();
        t.Net.Filter = (from, _, d) => { if (from.Equals(a.Endpoint)) { sent.Add(d); return false; } return true; };
        for (int i = 0; i < n; i++) a.Tun.Inject(Packets.Udp4(a.Overlay, b.Overlay, firstLen + i));
        a.Worker.PumpTun(t.NowMs);
        t.Net.Filter = null;
        return sent;
    }

    private static void Deliver(TestNet t, IEnumerable<byte[]> datagrams)
    {
        TestNode a = t.Nodes[0], b = t.Nodes[1];
        foreach (byte[] d in datagrams) b.Udp.Deliver(d, a.Endpoint);
        while (b.Udp.Pending > 0) b.Worker.PumpUdp(t.NowMs);
    }

    // The UDP payload lengths b wrote to its TUN since `from` (Packets.Udp4: 28 bytes of headers).
    private static List<int> Arrived(TestNet t, int from) =>
        t.Nodes[1].Tun.Written.Skip(from).Select(p => p.Length - 28).Order().ToList();

    private static string DropNames(Node n) =>
        string.Join(",", Enumerable.Range(0, (int)DropReason.Count).Where(i => n.Counters.Drops[i] > 0).Select(i => Counters.DropName((DropReason)i) + "=" + n.Counters.Drops[i]));

    [Theory]
    [InlineData(10, new[] { 5 })]                            // one row: one loss per group
    [InlineData(200, new[] { 0, 7, 22, 39 })]                // four rows, four losses
    [InlineData(200, new[] { 3, 40, 12, 41 })]               // two members and two rows lost
    [InlineData(200, new[] { 0, 1, 2, 40 })]                 // a burst of three and row 0
    [InlineData(100, new[] { 38, 39, 42 })]                  // three rows, the newest two and the last row
    public void MissingMembers_AreRebuilt_WhenRowsCoverThem(int lossBp, int[] lost)
    {
        var t = TwoNodes();
        (int k, int rows) = Fec.Size(lossBp);
        Node b = t.Nodes[1].Node;
        int tun0 = t.Nodes[1].Tun.Written.Count;
        List<byte[]> sent = Burst(t, k, lossBp);
        Assert.Equal(k + rows, sent.Count);
        Assert.Equal(Enumerable.Range(0, k + rows).Select(i => Record.Counter(sent[0]) + (ulong)i), sent.Select(d => Record.Counter(d)));
        Deliver(t, sent.Where((_, i) => !lost.Contains(i)));
        Assert.Equal(Enumerable.Range(0, k).Select(i => 100 + i).ToList(), Arrived(t, tun0));   // each exactly once
        Assert.Equal(lost.Count(i => i < k), b.FecRecovered);
        Assert.Equal(0, b.FecUnrecoverable);
        Assert.Equal("", DropNames(b));
    }

    // A group the timer closes after other records took counters (a ping here): back says where
    // the group ends, and the lost member is rebuilt, not the ping's counter.
    [Fact]
    public void ParityAfterOtherRecords_SaysHowFarBack()
    {
        var t = TwoNodes();
        TestNode a = t.Nodes[0], b = t.Nodes[1];
        int tun0 = b.Tun.Written.Count;
        List<byte[]> sent = Burst(t, 10, 200);                // 10 of 40: the group stays open
        Assert.Equal(10, sent.Count);
        t.Net.Filter = (from, _, d) => { if (from.Equals(a.Endpoint)) { sent.Add(d); return false; } return true; };
        Assert.True(a.Node.Mesh.SendPing(TestNet.PeerOf(a, b), 7, t.NowMs));
        a.Worker.FlushUdp(a.Node.UdpOut);
        t.Advance(10, 5);                                    // the hold ends: four rows
        t.Net.Filter = null;
        Assert.Equal(15, sent.Count);
        Deliver(t, sent.Where((_, i) => i != 9));             // the newest member lost
        Assert.Equal(Enumerable.Range(0, 10).Select(i => 100 + i).ToList(), Arrived(t, tun0));
        Assert.Equal(1, b.Node.FecRecovered);
        Assert.Equal("", DropNames(b.Node));
    }

    [Fact]
    public void ABurstBeyondTheRows_IsLost_AndNothingElseIs()
    {
        var t = TwoNodes();
        Node b = t.Nodes[1].Node;
        int tun0 = t.Nodes[1].Tun.Written.Count;
        List<byte[]> sent = Burst(t, 40, 200);
        int[] lost = [10, 11, 12, 13, 14];                    // five members, four rows
        Deliver(t, sent.Where((_, i) => !lost.Contains(i)));
        Assert.Equal(Enumerable.Range(0, 40).Where(i => !lost.Contains(i)).Select(i => 100 + i).ToList(), Arrived(t, tun0));
        Assert.Equal(0, b.FecRecovered);
        Assert.True(b.FecUnrecoverable >= 1);
        Assert.Equal("", DropNames(b));
    }

    [Fact]
    public void ParityForRecordsThatArrived_DeliversNothingTwice()
    {
        var t = TwoNodes();
        Node b = t.Nodes[1].Node;
        int tun0 = t.Nodes[1].Tun.Written.Count;
        List<byte[]> sent = Burst(t, 40, 200);
        Deliver(t, sent);
        Assert.Equal(40, Arrived(t, tun0).Count);
        Assert.Equal(0, b.FecRecovered);
        Assert.Equal(4, b.FecParityReceived);
    }

    [Fact]
    public void ReplayedOrForgedParity_IsDropped_AndRebuildsNothing()
    {
        var t = TwoNodes();
        Node b = t.Nodes[1].Node;
        int tun0 = t.Nodes[1].Tun.Written.Count;
        List<byte[]> sent = Burst(t, 32, 10);                 // one row
        byte[] parity = sent[32];
        byte[] forged = (byte[])parity.Clone();
        forged[^20] ^= 1;                                      // a bit of the sealed body
        Deliver(t, sent.Take(31));                             // the newest member lost
        Deliver(t, [forged]);
        Assert.Equal(1, t.Drops(1, DropReason.BadAuth));
        Assert.Equal(31, Arrived(t, tun0).Count);
        Deliver(t, [parity]);
        Assert.Equal(32, Arrived(t, tun0).Count);
        Deliver(t, [parity]);                                  // the same parity again
        Assert.Equal(1, t.Drops(1, DropReason.Replayed));
        Deliver(t, [sent[31]]);                                // the lost member after all: it was rebuilt
        Assert.Equal(1, t.Drops(1, DropReason.Replayed));
        Assert.Equal(1, b.FecLate);
        Deliver(t, [sent[30]]);                                // a member that came: a replay
        Assert.Equal(2, t.Drops(1, DropReason.Replayed));
        Assert.Equal(Enumerable.Range(0, 32).Select(i => 100 + i).ToList(), Arrived(t, tun0));
        Assert.Equal(1, b.FecRecovered);
    }

    // A member that authenticates may still seal anything as parity: what comes out of it is only
    // delivered past every check of a data record, and bad parity headers are malformed.
    [Fact]
    public void CraftedParity_FromThePeer_MeetsEveryCheckOfData()
    {
        var t = TwoNodes();
        TestNode a = t.Nodes[0], b = t.Nodes[1];
        Session s = TestNet.PeerOf(a, b).Current!;
        int tun0 = b.Tun.Written.Count;
        byte[] Parity(byte row, byte back, ulong mask, byte[] body)
        {
            byte[] slot = new byte[Tune.SlotLen];
            slot[Record.PayloadOffset] = row;
            slot[Record.PayloadOffset + 1] = back;
            BinaryPrimitives.WriteUInt64BigEndian(slot.AsSpan(Record.PayloadOffset + 2), mask);
            body.CopyTo(slot, Record.PayloadOffset + Fec.HeaderLen);
            return slot[..Record.Seal(s, slot, Fec.HeaderLen + body.Length, RecordFlags.Parity, 1420)];
        }
        byte[] spoofed = Packets.Udp4("100.64.0.9", b.Overlay, 20);   // a source a is not allowed
        s.SendCounter++;                                               // a counter never sent: "missing"
        Deliver(t, [Parity(0, 1, 1, spoofed)]);
        Assert.Equal(1, t.Drops(1, DropReason.SourceNotAllowed));
        Assert.Equal(tun0, b.Tun.Written.Count);
        s.SendCounter++;
        Deliver(t, [Parity(0, 1, 1, new byte[30])]);                     // not an IP packet
        Assert.Equal(1, t.Drops(1, DropReason.Malformed));
        int malformed = 1;
        foreach ((byte row, byte back, ulong mask) in new (byte, byte, ulong)[] { (4, 5, 1), (0, 65, 1), (1, 1, 1), (0, 0, 1), (0, 1, 2), (0, 1, ulong.MaxValue) })
        {
            Deliver(t, [Parity(row, back, mask, Packets.Udp4(a.Overlay, b.Overlay, 20))]);
            Assert.Equal(++malformed, t.Drops(1, DropReason.Malformed));
        }
        s.SendCounter++;
        Deliver(t, [Parity(0, 1, 1, Packets.Udp4(a.Overlay, b.Overlay, 20))]);   // a fine one: delivered
        Assert.Equal(tun0 + 1, b.Tun.Written.Count);
        Assert.Equal(0, b.Node.Counters.Drops[(int)DropReason.Replayed]);
    }

    [Fact]
    public void ReceiverMemory_IsBounded_ToSixteenPeers()
    {
        var t = TestNet.FullMesh(18);
        t.Start();
        TestNode hub = t.Nodes[0];
        for (int i = 1; i < 18; i++)
        {
            TestNode n = t.Nodes[i];
            Assert.Equal(1, t.Send(i, 0));
            Session s = TestNet.PeerOf(n, hub).Current!;
            byte[] slot = new byte[Tune.SlotLen];
            slot[Record.PayloadOffset + 1] = 1;
            slot[Record.PayloadOffset + 9] = 1;                                   // mask 1: the counter before it
            byte[] inner = Packets.Udp4(n.Overlay, hub.Overlay, 20);
            inner.CopyTo(slot, Record.PayloadOffset + Fec.HeaderLen);
            s.SendCounter++;
            byte[] record = slot[..Record.Seal(s, slot, Fec.HeaderLen + inner.Length, RecordFlags.Parity, 1420)];
            hub.Udp.Deliver(record, n.Endpoint);
            hub.Worker.PumpUdp(t.NowMs);
        }
        Assert.Equal(16, hub.Node.Peers.Count(p => p.FecIn != null));
        Assert.Equal(1, hub.Node.FecRefused);
        Assert.Equal(16, hub.Node.FecRecovered);
    }

    [Fact]
    public void Loss_IsMeasured_Reported_AndParityStopsWhenItEnds()
    {
        var t = TwoNodes();
        TestNode a = t.Nodes[0], b = t.Nodes[1];
        Peer bAtA = TestNet.PeerOf(a, b), aAtB = TestNet.PeerOf(b, a);
        int n = 0;
        t.Net.Filter = (from, _, d) => !(from.Equals(a.Endpoint) && d[0] == Spec.TlsApplicationData && ++n % 20 == 0);   // 5 % of a's records
        for (int ms = 0; ms < 3000; ms += 10)
        {
            for (int i = 0; i < 10; i++) a.Tun.Inject(Packets.Udp4(a.Overlay, b.Overlay, 200));
            t.Advance(10, 10);
        }
        Assert.True(aAtB.LossBp is >= 300 and <= 700, $"loss {aAtB.LossBp} session {aAtB.LossSession != null} since {aAtB.LossSinceMs} now {t.NowMs} at {aAtB.FecAtMs} rx {aAtB.LossSession?.Received} hi {aAtB.LossSession?.Window.Highest} told {aAtB.LossToldBp} n {n}");
        Assert.InRange(bAtA.FecReportedBp, 300, 700);
        Assert.True(a.Node.FecParitySent > 100);
        Assert.True(b.Node.FecRecovered > 50);
        t.Net.Filter = null;
        for (int ms = 0; ms < 6000; ms += 10)
        {
            for (int i = 0; i < 10; i++) a.Tun.Inject(Packets.Udp4(a.Overlay, b.Overlay, 200));
            t.Advance(10, 10);
        }
        Assert.Equal(0, aAtB.LossBp);
        Assert.Equal(0, bAtA.FecReportedBp);
        long parity = a.Node.FecParitySent;
        for (int i = 0; i < 200; i++) a.Tun.Inject(Packets.Udp4(a.Overlay, b.Overlay, 200));
        t.Advance(100, 10);
        Assert.Equal(parity, a.Node.FecParitySent);                     // a clean path: no parity at all
    }

    [Fact]
    public void FecOff_SendsNoParity_ThoughLossIsReported()
    {
        var t = TestNet.FullMesh(2, c => c.Fec = false);
        t.Start();
        Assert.Equal(1, t.Send(0, 1));
        List<byte[]> sent = Burst(t, 40, 200);
        Assert.Equal(40, sent.Count);
        Assert.Equal(0, t.Nodes[0].Node.FecParitySent);
    }

    [Fact]
    public void SteadyState_WithParityAndLoss_AllocatesNothing()
    {
        var t = TwoNodes();
        Node a = t.Nodes[0].Node, b = t.Nodes[1].Node;
        Peer bAtA = TestNet.PeerOf(t.Nodes[0], t.Nodes[1]);
        var outBatch = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        var parity = new PacketBatch(Tune.BatchSize / 2, Tune.SlotLen);
        var inBatch = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        byte[] packet = Packets.Udp4("100.64.0.1", "100.64.0.2", 1392);
        var from = t.Nodes[0].Endpoint;
        int round = 0;
        void RoundTrip()
        {
            a.LossReported(bAtA, 200, t.NowMs);
            outBatch.Count = Tune.BatchSize;
            for (int i = 0; i < Tune.BatchSize; i++)
            {
                packet.CopyTo(outBatch.Slot(i)[Record.PayloadOffset..]);
                outBatch.Offset[i] = Record.PayloadOffset;
                outBatch.Length[i] = packet.Length;
            }
            a.ParityOut = parity;
            a.ProcessTunBatch(outBatch, t.NowMs);
            a.ParityOut = null;
            inBatch.Count = 0;
            void Take(PacketBatch from1, int i)
            {
                from1.Packet(i).CopyTo(inBatch.Slot(inBatch.Count));
                inBatch.Offset[inBatch.Count] = 0;
                inBatch.Length[inBatch.Count] = from1.Length[i];
                inBatch.Endpoints[inBatch.Count++] = from;
            }
            for (int i = 0; i < Tune.BatchSize; i++)
                if ((i + round) % 23 != 0) Take(outBatch, i);              // about 4 % of the data lost
            for (int i = 0; i < parity.Count && inBatch.Count < inBatch.Capacity; i++) Take(parity, i);
            parity.Count = 0;
            round++;
            b.ProcessUdpBatch(inBatch, t.NowMs);
        }
        Allocations.AssertNone(RoundTrip, 100);
        Assert.True(b.FecRecovered > 500, $"recovered {b.FecRecovered}");
        Assert.True(a.FecParitySent > 1000);
    }
}
