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
}
