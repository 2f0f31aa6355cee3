using System.Buffers.Binary;

namespace Veil.Tests;

/// <summary>Received segments merged into one super-packet for the TUN, checked by splitting it again.</summary>
public class CoalescerTests
{
    private static List<byte[]> Segments(bool v6, int payload, int mss, byte flags = 0x10, int options = 0)
    {
        byte[] super = SegmenterTests.Tcp(v6, payload, flags, options);
        var s = new Segmenter();
        Assert.True(s.Start(SegmenterTests.Read(super, 1, v6 ? (byte)4 : (byte)1, mss, v6 ? 40 : 20, 16)));
        var list = new List<byte[]>();
        byte[] buf = new byte[9000];
        for (int n; (n = s.Next(buf)) > 0;) list.Add(buf[..n]);
        return list;
    }

    private static PacketBatch BatchOf(IEnumerable<byte[]> packets)
    {
        var b = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        foreach (byte[] p in packets)
        {
            p.CopyTo(b.Slot(b.Count)[Record.PayloadOffset..]);
            b.Offset[b.Count] = Record.PayloadOffset;
            b.Length[b.Count] = p.Length;
            b.Count++;
        }
        return b;
    }

    [Theory]
    [InlineData(false, 20000, 1380, 0)]
    [InlineData(true, 20000, 1360, 12)]
    [InlineData(false, 1380 * 3 + 100, 1380, 12)]
    public void Run_MergedAndSplitAgain_GivesTheSameSegments(bool v6, int payload, int mss, int options)
    {
        List<byte[]> segs = Segments(v6, payload, mss, 0x18, options);   // last one carries PSH
        PacketBatch b = BatchOf(segs);
        Assert.Equal(segs.Count, Coalescer.RunEnd(b, 0));
        // what WriteCoalesced hands the kernel: virtio header, the head whole, the others' payloads
        Span<byte> head = b.Packet(0);
        int hdr = Coalescer.HeaderLen(head), ip = Coalescer.IpHeaderLen(head), total = 0;
        for (int k = 0; k < segs.Count; k++) total += segs[k].Length - hdr;
        Coalescer.RewriteHead(head, hdr, ip, total, b.Packet(segs.Count - 1));
        byte[] super = new byte[hdr + total];
        head[..hdr].CopyTo(super);
        int at = hdr;
        for (int k = 0; k < segs.Count; k++) { b.Packet(k)[hdr..].CopyTo(super.AsSpan(at)); at += segs[k].Length - hdr; }
        // the seed in the TCP checksum field is the pseudo-header sum for the whole run
        ulong pseudo = Checksum.Add(Checksum.Add(0, super.AsSpan(v6 ? 8 : 12, v6 ? 32 : 8)), (uint)(super.Length - ip)) + 6;
        Assert.Equal(Checksum.Fold(pseudo), BinaryPrimitives.ReadUInt16BigEndian(super.AsSpan(ip + 16)));
        var split = new Segmenter();
        Assert.True(split.Start(SegmenterTests.Read(super, 1, v6 ? (byte)4 : (byte)1, segs[0].Length - hdr, ip, 16)));
        byte[] buf = new byte[9000];
        for (int k = 0; k < segs.Count; k++)
        {
            int n = split.Next(buf);
            Assert.Equal(segs[k], buf[..n]);
        }
        Assert.Equal(0, split.Next(buf));
    }

    // TAP frames: a run needs one Ethernet header (addresses, tag, type) over mergeable IP packets;
    // a frame to another MAC, or with another VLAN, ends it.
    [Fact]
    public void TapRun_SameEthernetHeaderOnly()
    {
        List<byte[]> frames = Segments(false, 1380 * 6, 1380).ConvertAll(p => SegmenterTests.Frame(p, vlan: true));
        Assert.Equal(6, Coalescer.RunEnd(BatchOf(frames), 0, link: 18));
        var other = new List<byte[]>(frames);
        other[3] = (byte[])frames[3].Clone();
        other[3][5] ^= 1;                                          // another destination MAC
        Assert.Equal(3, Coalescer.RunEnd(BatchOf(other), 0, link: 18));
        other[3] = (byte[])frames[3].Clone();
        other[3][15] = 43;                                         // another VLAN
        Assert.Equal(3, Coalescer.RunEnd(BatchOf(other), 0, link: 18));
        Assert.Equal(18, Ethernet.IpOffset(frames[0]));
        Assert.Equal(14, Ethernet.IpOffset(SegmenterTests.Frame(frames[0][18..])));
        byte[] arp = SegmenterTests.Frame(frames[0][18..]);
        arp[12] = 0x08; arp[13] = 0x06;
        Assert.Equal(-1, Ethernet.IpOffset(arp));
        Assert.Equal(-1, Ethernet.IpOffset(arp.AsSpan(0, 13)));
    }

    [Fact]
    public void Run_BrokenByGapOtherFlowPshOrOptions()
    {
        List<byte[]> segs = Segments(false, 1380 * 6, 1380);
        // a gap in sequence numbers
        var gap = new List<byte[]>(segs);
        gap.RemoveAt(3);
        Assert.Equal(3, Coalescer.RunEnd(BatchOf(gap), 0));
        // another flow in between
        var mixed = new List<byte[]>(segs);
        byte[] other = (byte[])segs[2].Clone();
        BinaryPrimitives.WriteUInt16BigEndian(other.AsSpan(20), 40001);
        mixed[2] = other;
        Assert.Equal(2, Coalescer.RunEnd(BatchOf(mixed), 0));
        // PSH in the middle ends the run after it
        var psh = segs.Select(s => (byte[])s.Clone()).ToList();
        psh[1][33] = 0x18;
        Assert.Equal(2, Coalescer.RunEnd(BatchOf(psh), 0));
        // IPv4 options: not merged at all
        var opt = segs.Select(s => (byte[])s.Clone()).ToList();
        opt[0][0] = 0x46;
        Assert.Equal(1, Coalescer.RunEnd(BatchOf(opt), 0));
        // not TCP
        Assert.Equal(1, Coalescer.RunEnd(BatchOf(new[] { Packets.Udp4("100.64.0.1", "100.64.0.2", 100), Packets.Udp4("100.64.0.1", "100.64.0.2", 100) }), 0));
    }

    // Datagrams as the kernel would cut a UDP_SEGMENT send (IPv4 ids counting up, full checksums).
    private static List<byte[]> Datagrams(bool v6, int payload, int size)
    {
        var s = new Segmenter();
        Assert.True(s.Start(SegmenterTests.Read(SegmenterTests.Udp(v6, payload), 1, 5, size, v6 ? 40 : 20, 6)));
        var list = new List<byte[]>();
        byte[] buf = new byte[9000];
        for (int n; (n = s.Next(buf)) > 0;) list.Add(buf[..n]);
        return list;
    }

    [Theory]
    [InlineData(false, 1200 * 20, 1200)]
    [InlineData(true, 1200 * 20, 1200)]
    [InlineData(false, 1200 * 5 + 300, 1200)]
    [InlineData(true, 1432 * 44, 1432)]
    public void UdpRun_MergedAndSplitAgain_GivesTheSameDatagrams(bool v6, int payload, int size)
    {
        List<byte[]> dgrams = Datagrams(v6, payload, size);
        PacketBatch b = BatchOf(dgrams);
        Assert.Equal(1, Coalescer.RunEnd(b, 0));                    // no UDP runs unless the TUN takes USO
        Assert.Equal(dgrams.Count, Coalescer.RunEnd(b, 0, udp: true));
        Span<byte> head = b.Packet(0);
        int hdr = Coalescer.HeaderLen(head), ip = Coalescer.IpHeaderLen(head), total = 0;
        Assert.Equal(ip + 8, hdr);
        for (int k = 0; k < dgrams.Count; k++) total += dgrams[k].Length - hdr;
        Coalescer.RewriteHead(head, hdr, ip, total, b.Packet(dgrams.Count - 1));
        byte[] super = new byte[hdr + total];
        head[..hdr].CopyTo(super);
        int at = hdr;
        for (int k = 0; k < dgrams.Count; k++) { b.Packet(k)[hdr..].CopyTo(super.AsSpan(at)); at += dgrams[k].Length - hdr; }
        Assert.Equal(8 + total, BinaryPrimitives.ReadUInt16BigEndian(super.AsSpan(ip + 4)));
        ulong pseudo = Checksum.Add(Checksum.Add(0, super.AsSpan(v6 ? 8 : 12, v6 ? 32 : 8)), (uint)(8 + total)) + 17;
        Assert.Equal(Checksum.Fold(pseudo), BinaryPrimitives.ReadUInt16BigEndian(super.AsSpan(ip + 6)));
        var split = new Segmenter();
        Assert.True(split.Start(SegmenterTests.Read(super, 1, 5, size, ip, 6)));
        byte[] buf = new byte[9000];
        foreach (byte[] d in dgrams) Assert.Equal(d, buf[..split.Next(buf)]);
        Assert.Equal(0, split.Next(buf));
    }

    [Fact]
    public void UdpRun_BrokenByOtherFlowLongerDatagramOrFragment()
    {
        List<byte[]> d = Datagrams(false, 1200 * 6, 1200);
        var port = d.ConvertAll(x => (byte[])x.Clone());
        port[3][21] ^= 1;                                           // another source port
        Assert.Equal(3, Coalescer.RunEnd(BatchOf(port), 0, udp: true));
        var ttl = d.ConvertAll(x => (byte[])x.Clone());
        ttl[2][8] = 1;
        Assert.Equal(2, Coalescer.RunEnd(BatchOf(ttl), 0, udp: true));
        List<byte[]> shortFirst = Datagrams(false, 1200 * 2, 1200);
        shortFirst.Insert(0, Datagrams(false, 500, 1200)[0]);       // a longer one may not follow a shorter
        Assert.Equal(1, Coalescer.RunEnd(BatchOf(shortFirst), 0, udp: true));
        var shortMid = new List<byte[]>(d);
        shortMid.Insert(2, Datagrams(false, 500, 1200)[0]);         // a shorter one closes the run, itself included
        Assert.Equal(3, Coalescer.RunEnd(BatchOf(shortMid), 0, udp: true));
        var frag = d.ConvertAll(x => (byte[])x.Clone());
        frag[0][6] |= 0x20;                                         // more fragments
        Assert.Equal(1, Coalescer.RunEnd(BatchOf(frag), 0, udp: true));
        var badLen = d.ConvertAll(x => (byte[])x.Clone());
        badLen[1][25] ^= 1;                                         // UDP length disagrees with the IP length
        Assert.Equal(1, Coalescer.RunEnd(BatchOf(badLen), 0, udp: true));
        var mixed = new List<byte[]>(d.GetRange(0, 2)) { Datagrams(true, 1200 * 2, 1200)[0] };
        Assert.Equal(2, Coalescer.RunEnd(BatchOf(mixed), 0, udp: true));
        List<byte[]> tcp = Segments(false, 1380 * 3, 1380);
        Assert.Equal(3, Coalescer.RunEnd(BatchOf(tcp), 0, udp: true));   // TCP runs as before
    }
}
