using System.Buffers.Binary;

namespace Veil.Tests;

/// <summary>--mode tap|hub (§8.1): the MAC table on its own, then frames through three nodes.</summary>
public class SwitchTests
{
    internal const ulong A = 0x02_00_00_00_00_0A, B = 0x02_00_00_00_00_0B;
    internal const ulong Broadcast = 0xFF_FF_FF_FF_FF_FF;

    // ---- the table ----

    [Fact]
    public void Table_Learns_Refreshes_AndForgetsAfterIdle()
    {
        var t = new MacTable();
        Assert.Equal(-1, t.Lookup(A, 0));
        Assert.Equal(Learned.New, t.Learn(A, 3, 1000));
        Assert.Equal(3, t.Lookup(A, 1000));
        Assert.Equal(Learned.Known, t.Learn(A, 3, 200_000));                 // refreshed: idle from here
        Assert.Equal(3, t.Lookup(A, 200_000 + MacTable.IdleMs - 1));
        Assert.Equal(-1, t.Lookup(A, 200_000 + MacTable.IdleMs));
        Assert.Equal(1, t.CountOf(3));
    }

    [Fact]
    public void Table_MoveToAnotherPeer_IsAtOnce()
    {
        var t = new MacTable();
        t.Learn(A, 1, 0);
        t.Learn(B, 1, 0);
        Assert.Equal(Learned.Moved, t.Learn(A, 2, 5));
        Assert.Equal(2, t.Lookup(A, 5));
        Assert.Equal(1, t.Lookup(B, 5));
        Assert.Equal((1, 1, 1L), (t.CountOf(1), t.CountOf(2), t.Moves));
    }

    [Fact]
    public void Table_OnePeersFlood_FillsOnlyItsShare()
    {
        var t = new MacTable();
        t.Learn(A, 2, 0);
        for (ulong m = 1; m <= 10_000; m++) t.Learn(0x02_10_00_00_00_00 | m, 1, 10);
        Assert.Equal(MacTable.MaxPerPeer, t.CountOf(1));
        Assert.Equal(10_000 - MacTable.MaxPerPeer, t.Refusals);
        Assert.Equal(2, t.Lookup(A, 10));                                     // the other peer kept its entry
        Assert.Equal(Learned.New, t.Learn(B, 2, 10));
        // Once the flood's entries are idle, the share is free again (swept when needed).
        Assert.Equal(Learned.New, t.Learn(0x02_20_00_00_00_01, 1, 10 + MacTable.IdleMs));
        Assert.Equal(1, t.CountOf(1));
    }

    [Fact]
    public void Table_IsBoundedAcrossPeers_AndPeerRemovalFreesItsEntries()
    {
        var t = new MacTable();
        int peers = MacTable.MaxEntries / MacTable.MaxPerPeer;
        for (int p = 0; p < peers; p++)
            for (ulong m = 0; m < MacTable.MaxPerPeer; m++) Assert.Equal(Learned.New, t.Learn(0x02_00_00_00_00_00UL | (ulong)p << 16 | m, p, 0));
        Assert.Equal(MacTable.MaxEntries, t.Count);
        Assert.Equal(Learned.Refused, t.Learn(A, peers, 1));
        t.Remove(0, 1);
        Assert.Equal(MacTable.MaxEntries - MacTable.MaxPerPeer, t.Count);
        Assert.Equal(0, t.CountOf(0));
        Assert.Equal(Learned.New, t.Learn(A, peers, 2));
    }

    [Fact]
    public void MacText_AndParse_RoundTrip()
    {
        Assert.Equal("02:00:00:00:00:0a", Ethernet.MacText(A));
        Assert.True(Ethernet.TryParseMac("02:00:00:00:00:0A", out ulong m));
        Assert.Equal(A, m);
        Assert.True(Ethernet.TryParseMac("02-00-00-00-00-0b", out m));
        Assert.Equal(B, m);
        foreach (string bad in new[] { "", "02:00:00:00:00", "02:00:00:00:00:0g", "02:00:00:00:00:0a:", "0200.0000.000a" })
            Assert.False(Ethernet.TryParseMac(bad, out _));
        Key32 key = TestNet.PublicOf(TestNode.KeyFromSeed(1));
        ulong own = TunDevice.MacFor(key);
        Assert.False(Ethernet.IsGroup(own));
        Assert.Equal(2UL, own >> 40 & 3);                                   // locally administered unicast
    }

    [Fact]
    public void RebuiltLen_TrimsToTheIpPacket_BehindVlanTags()
    {
        byte[] ip = Packets.Udp4("100.64.0.1", "100.64.0.2", 20);
        byte[] Frame(params ushort[] types)
        {
            var f = new List<byte>(new byte[12]);
            foreach (ushort ty in types) { f.Add((byte)(ty >> 8)); f.Add((byte)ty); if (ty == Ethernet.TypeVlan) { f.Add(0); f.Add(7); } }
            f.AddRange(ip);
            f.AddRange(new byte[30]);                                       // the zero tail a rebuild leaves
            return f.ToArray();
        }
        Assert.Equal(14 + ip.Length, Ethernet.RebuiltLen(Frame(Ethernet.TypeIPv4)));
        Assert.Equal(18 + ip.Length, Ethernet.RebuiltLen(Frame(Ethernet.TypeVlan, Ethernet.TypeIPv4)));
        byte[] arp = Frame(0x0806);
        Assert.Equal(arp.Length, Ethernet.RebuiltLen(arp));                 // not IP: all of it
        Assert.Equal(5, Ethernet.RebuiltLen(new byte[5]));
    }

    // ---- through three nodes ----

    internal static TestNet Three(L2Mode mode = L2Mode.Tap, Action<int, UpConfig>? tweak = null)
    {
        var t = TestNet.FullMesh(3, cfg => cfg.Mode = mode);
        if (tweak != null)
        {
            // FullMesh's tweak has no index: rebuild with one.
            t = new TestNet();
            var keys = new Key32[3];
            for (int i = 0; i < 3; i++) keys[i] = TestNode.KeyFromSeed((byte)(1 + i));
            for (int i = 0; i < 3; i++)
            {
                var cfg = new UpConfig { PrivateKey = keys[i], Mtu = 1420, Mode = mode };
                for (int j = 0; j < 3; j++)
                    if (j != i) cfg.Peers.Add(new PeerConfig { PublicKey = TestNet.PublicOf(keys[j]), Endpoint = TestNet.Ep(j) });
                tweak(i, cfg);
                t.Nodes.Add(new TestNode(t.Net, keys[i], cfg, TestNet.Ep(i), $"100.64.0.{i + 1}", 1_700_000_000_000_000_000L));
            }
        }
        for (int i = 0; i < 3; i++) t.Nodes[i].Node.LocalMac = Mac(i);
        t.Start();
        t.Advance(500);
        return t;
    }

    private static ulong Mac(int node) => 0x02_00_00_00_01_00UL + (ulong)node;

    internal static byte[] Frame(ulong dst, ulong src, int payloadLen = 46, ushort type = 0x88B5, byte tag = 0)
    {
        byte[] f = new byte[Ethernet.HeaderLen + payloadLen];
        BinaryPrimitives.WriteUInt32BigEndian(f, (uint)(dst >> 16));
        BinaryPrimitives.WriteUInt16BigEndian(f.AsSpan(4), (ushort)dst);
        BinaryPrimitives.WriteUInt32BigEndian(f.AsSpan(6), (uint)(src >> 16));
        BinaryPrimitives.WriteUInt16BigEndian(f.AsSpan(10), (ushort)src);
        BinaryPrimitives.WriteUInt16BigEndian(f.AsSpan(12), type);
        if (payloadLen > 0) f[^1] = tag;
        return f;
    }

    // Injects a frame at node `at`'s TAP; returns how many frames each node wrote to its TAP.
    internal static int[] Inject(TestNet t, int at, byte[] frame)
    {
        int[] before = t.Nodes.Select(n => n.Tun.Written.Count).ToArray();
        t.Nodes[at].Tun.Inject(frame);
        t.Pump();
        return t.Nodes.Select((n, i) => n.Tun.Written.Count - before[i]).ToArray();
    }

    [Fact]
    public void Broadcast_ReachesEveryOtherNodeOnce_AndUnicastIsSwitched()
    {
        var t = Three();
        byte[] bc = Frame(Broadcast, Mac(0), tag: 1);
        Assert.Equal([0, 1, 1], Inject(t, 0, bc));
        Assert.Equal(bc, t.Nodes[1].Tun.Written[^1]);
        Assert.Equal(bc, t.Nodes[2].Tun.Written[^1]);
        Assert.Equal(1, t.Nodes[0].Node.FramesFlooded);
        // Node 1 answers to node 0's MAC: it learned it from the broadcast, so only node 0 gets it.
        Assert.Equal([1, 0, 0], Inject(t, 1, Frame(Mac(0), Mac(1), tag: 2)));
        Assert.Equal(1, t.Nodes[1].Node.FramesSwitched);
        Assert.Equal([0, 1, 0], Inject(t, 0, Frame(Mac(1), Mac(0), tag: 3)));
        // A MAC nobody has sent from is flooded, and counted as unknown.
        Assert.Equal([0, 1, 1], Inject(t, 0, Frame(0x02_99_00_00_00_01, Mac(0))));
        Assert.Equal(1, t.Nodes[0].Node.FramesUnknown);
        Assert.Equal(0, t.Nodes.Sum(n => n.Node.Counters.Drops.Sum()));
    }

    [Fact]
    public void MacThatMoves_IsFollowedWithinOneFrame()
    {
        var t = Three();
        const ulong laptop = 0x02_AA_00_00_00_01;
        Inject(t, 1, Frame(Broadcast, laptop));                          // the laptop is behind node 1
        Assert.Equal([0, 1, 0], Inject(t, 0, Frame(laptop, Mac(0))));
        Inject(t, 2, Frame(Mac(0), laptop));                             // one frame from behind node 2
        Assert.Equal([0, 0, 1], Inject(t, 0, Frame(laptop, Mac(0))));
        Assert.Equal(1, t.Nodes[0].Node.Macs.Moves);
    }

    [Fact]
    public void Hub_FloodsEveryFrame()
    {
        var t = Three(L2Mode.Hub);
        Inject(t, 1, Frame(Broadcast, Mac(1)));
        Assert.True(t.Nodes[0].Node.Macs.Lookup(Mac(1), t.NowMs) >= 0);     // learned, for the source checks
        Assert.Equal([0, 1, 1], Inject(t, 0, Frame(Mac(1), Mac(0))));
        Assert.Equal(0, t.Nodes[0].Node.FramesSwitched);
        Assert.Equal(1, t.Nodes[0].Node.FramesFlooded);
    }

    [Fact]
    public void VlanTaggedFrame_ArrivesTagged()
    {
        var t = Three();
        byte[] tagged = Frame(Broadcast, Mac(0), payloadLen: 200, type: Ethernet.TypeVlan);
        tagged[14] = 0x20; tagged[15] = 0x0A;                               // priority 1, VLAN 10
        tagged[16] = 0x08; tagged[17] = 0x00;
        Assert.Equal([0, 1, 1], Inject(t, 0, tagged));
        Assert.Equal(tagged, t.Nodes[2].Tun.Written[^1]);
    }

    [Fact]
    public void LargestFrame_FitsItsRecord()
    {
        var t = Three();
        byte[] big = Frame(Broadcast, Mac(0), payloadLen: 1420 + 4);         // MTU plus a VLAN tag
        Assert.Equal([0, 1, 1], Inject(t, 0, big));
        Assert.Equal(big, t.Nodes[1].Tun.Written[^1]);
    }

    [Fact]
    public void Runt_FromTheTap_IsMalformed()
    {
        var t = Three();
        Assert.Equal([0, 0, 0], Inject(t, 0, new byte[13]));
        Assert.Equal(1, t.Drops(0, DropReason.Malformed));
    }

    // Frames an authenticated peer crafts, sealed under its session: each refused on its own count.
    [Fact]
    public void CraftedFrames_FromAPeer_AreCheckedBySourceMac()
    {
        var t = Three(tweak: (i, cfg) => { if (i == 0) cfg.Peers[0].AllowedMacs.Add(A); });   // node 0 lets node 1 use A only
        TestNode n0 = t.Nodes[0], n1 = t.Nodes[1], n2 = t.Nodes[2];
        int Deliver(TestNode from, byte[] payload)
        {
            Session s = TestNet.PeerOf(from, n0).Current!;
            byte[] slot = new byte[Tune.SlotLen];
            payload.CopyTo(slot, Record.PayloadOffset);
            int before = n0.Tun.Written.Count;
            n0.Udp.Deliver(slot[..Record.Seal(s, slot, payload.Length, RecordFlags.Data, 1438)], from.Endpoint);
            while (n0.Udp.Pending > 0) n0.Worker.PumpUdp(t.NowMs);
            return n0.Tun.Written.Count - before;
        }
        Assert.Equal(0, Deliver(n1, Frame(Broadcast, B)));                  // not on its list
        Assert.Equal(1, t.Drops(0, DropReason.MacNotAllowed));
        Assert.Equal(1, Deliver(n1, Frame(Broadcast, A)));
        Assert.Equal(0, Deliver(n2, Frame(Broadcast, Broadcast)));          // a group address as source
        Assert.Equal(0, Deliver(n2, Frame(Broadcast, 0)));
        Assert.Equal(0, Deliver(n2, Frame(Broadcast, Mac(0))));             // node 0's own
        Assert.Equal(4, t.Drops(0, DropReason.MacNotAllowed));
        Assert.Equal(0, Deliver(n2, new byte[13]));
        Assert.Equal(1, t.Drops(0, DropReason.Malformed));
        // Node 2 has no list: any unicast MAC, up to its share; node 1's entry stays.
        for (int m = 0; m < MacTable.MaxPerPeer + 50; m++) Deliver(n2, Frame(Broadcast, 0x02_50_00_00_00_00UL + (ulong)m));
        Assert.Equal(MacTable.MaxPerPeer, n0.Node.Macs.CountOf(TestNet.PeerOf(n0, n2).Id));
        Assert.Equal(4 + 50, t.Drops(0, DropReason.MacNotAllowed));
        Assert.Equal(TestNet.PeerOf(n0, n1).Id, n0.Node.Macs.Lookup(A, t.NowMs));
    }

    [Fact]
    public void RemovedPeer_TakesItsMacsWithIt()
    {
        var t = Three();
        Inject(t, 1, Frame(Broadcast, A));
        Peer p1 = TestNet.PeerOf(t.Nodes[0], t.Nodes[1]);
        Assert.Equal(p1.Id, t.Nodes[0].Node.Macs.Lookup(A, t.NowMs));
        t.Nodes[0].Node.RemovePeer(p1);
        Assert.Equal(-1, t.Nodes[0].Node.Macs.Lookup(A, t.NowMs));
    }

    [Fact]
    public void StatusJson_ShowsTheSwitch()
    {
        var t = Three();
        Inject(t, 1, Frame(Broadcast, A));
        var cfg = new UpConfig { Mode = L2Mode.Tap, Mtu = 1420 };
        string json = new StatusView(t.Nodes[0].Node, cfg, 51820, 0, () => t.NowMs).Json();
        using var doc = System.Text.Json.JsonDocument.Parse(json);
        var sw = doc.RootElement.GetProperty("switch");
        Assert.Equal("tap", sw.GetProperty("mode").GetString());
        var macs = sw.GetProperty("macs");
        Assert.Equal(1, macs.GetArrayLength());
        Assert.Equal("02:00:00:00:00:0a", macs[0].GetProperty("mac").GetString());
        Assert.Equal(TestNet.PeerOf(t.Nodes[0], t.Nodes[1]).Name, macs[0].GetProperty("peer").GetString());
        Assert.Equal(0, sw.GetProperty("flooded").GetInt64());
    }

    // Frames to a learned MAC, and one broadcast per batch (its copies go to UdpOut), both ways.
    [Fact]
    public void SwitchedAndFloodedFrames_AllocateNothing()
    {
        var t = Three();
        Inject(t, 1, Frame(Broadcast, Mac(1)));
        Node a = t.Nodes[0].Node, b = t.Nodes[1].Node;
        var outBatch = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        var inBatch = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        byte[] frame = Frame(Mac(1), Mac(0), payloadLen: 1400), broadcast = Frame(Broadcast, Mac(0));
        Endpoint from = t.Nodes[0].Endpoint;
        void RoundTrip()
        {
            outBatch.Count = Tune.BatchSize;
            for (int i = 0; i < Tune.BatchSize; i++)
            {
                byte[] f = i == 0 ? broadcast : frame;
                f.CopyTo(outBatch.Slot(i)[Record.PayloadOffset..]);
                outBatch.Offset[i] = Record.PayloadOffset;
                outBatch.Length[i] = f.Length;
            }
            a.ProcessTunBatch(outBatch, t.NowMs);
            a.UdpOut.Count = 0;
            inBatch.Count = Tune.BatchSize - 1;                     // slot 0 went out as copies
            for (int i = 1; i < Tune.BatchSize; i++)
            {
                outBatch.Packet(i).CopyTo(inBatch.Slot(i - 1));
                inBatch.Offset[i - 1] = 0;
                inBatch.Length[i - 1] = outBatch.Length[i];
                inBatch.Endpoints[i - 1] = from;
            }
            b.ProcessUdpBatch(inBatch, t.NowMs);
        }
        long switched = a.FramesSwitched;
        Allocations.AssertNone(RoundTrip, 100);
        Assert.Equal(switched + 320 * 63, a.FramesSwitched);
        Assert.Equal(320 * 63, b.Counters.TunTxPackets);
        Assert.Equal(0, b.Counters.Drops.Sum());
    }
}
