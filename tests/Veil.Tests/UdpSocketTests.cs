using System.Net;

namespace Veil.Tests;

/// <summary>Real sockets on loopback: segmentation offload on send, coalescing on receive.</summary>
public class UdpSocketTests
{
    private static void Fill(PacketBatch b, int i, int len, Endpoint to, byte tag)
    {
        Span<byte> slot = b.Slot(i);
        for (int k = 0; k < len; k++) slot[k] = (byte)(tag + k);
        b.Offset[i] = 0;
        b.Length[i] = len;
        b.Endpoints[i] = to;
    }

    private static List<byte[]> ReceiveAll(UdpSocket rx, int expect)
    {
        var got = new List<byte[]>();
        var b = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        for (int tries = 0; tries < 200 && got.Count < expect; tries++)
        {
            b.Count = 0;
            if (rx.ReceiveBatch(b) == 0) { Thread.Sleep(5); continue; }
            for (int i = 0; i < b.Count; i++) got.Add(b.Packet(i).ToArray());
        }
        return got;
    }

    [Fact]
    public void SendBatch_RunsOfEqualSizes_ArriveIntactAndInOrder()
    {
        using UdpSocket tx = UdpSocket.Bind(IPAddress.Loopback, 0), rx = UdpSocket.Bind(IPAddress.Loopback, 0), other = UdpSocket.Bind(IPAddress.Loopback, 0);
        var to = Endpoint.FromIp(IPAddress.Loopback, rx.LocalPort);
        var elsewhere = Endpoint.FromIp(IPAddress.Loopback, other.LocalPort);
        var b = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        int[] lens = new int[Tune.BatchSize];
        for (int i = 0; i < Tune.BatchSize; i++) lens[i] = 1459;
        lens[20] = 700;              // a shorter one ends a run
        lens[21] = 0;                // a dropped slot is skipped
        lens[40] = 1200;             // and another run starts
        for (int i = 0; i < Tune.BatchSize; i++) Fill(b, i, lens[i], i == 50 ? elsewhere : to, (byte)i);
        b.Count = Tune.BatchSize;
        Assert.Equal(0, tx.SendBatch(b));
        var expect = new List<int>();
        for (int i = 0; i < Tune.BatchSize; i++) if (lens[i] > 0 && i != 50) expect.Add(i);
        List<byte[]> got = ReceiveAll(rx, expect.Count);
        Assert.Equal(expect.Count, got.Count);
        for (int k = 0; k < expect.Count; k++)
        {
            int i = expect[k];
            Assert.Equal(lens[i], got[k].Length);
            Assert.Equal((byte)i, got[k][0]);
            Assert.Equal((byte)(i + lens[i] - 1), got[k][^1]);
        }
        Assert.Single(ReceiveAll(other, 1));
    }

    // A host check: this machine has what the fast path needs (skip elsewhere: Category!=Host).
    [Fact]
    [Trait("Category", "Host")]
    public void Offloads_ProbedOnThisKernel()
    {
        using UdpSocket s = UdpSocket.Bind(IPAddress.Loopback, 0);
        Assert.True(s.Gso, "UDP_SEGMENT not available: the batched send path is not tested here");
        Assert.True(s.Gro, "UDP_GRO not available: the coalesced receive path is not tested here");
    }

    [Fact]
    public void SendBatch_WithoutGso_SameResult()
    {
        using UdpSocket tx = UdpSocket.Bind(IPAddress.Loopback, 0), rx = UdpSocket.Bind(IPAddress.Loopback, 0);
        tx.Gso = false;
        var to = Endpoint.FromIp(IPAddress.Loopback, rx.LocalPort);
        var b = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        for (int i = 0; i < 10; i++) Fill(b, i, 1000 - i, to, (byte)i);
        b.Count = 10;
        Assert.Equal(0, tx.SendBatch(b));
        List<byte[]> got = ReceiveAll(rx, 10);
        Assert.Equal(Enumerable.Range(0, 10).Select(i => 1000 - i), got.Select(g => g.Length));
    }

    [Fact]
    public void ReceiveBatch_ManySendersAndSizes_EachDatagramWithItsSender()
    {
        using UdpSocket a = UdpSocket.Bind(IPAddress.Loopback, 0), c = UdpSocket.Bind(IPAddress.Loopback, 0), rx = UdpSocket.Bind(IPAddress.Loopback, 0);
        var to = Endpoint.FromIp(IPAddress.Loopback, rx.LocalPort);
        foreach (UdpSocket tx in new[] { a, c })
        {
            var b = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
            for (int i = 0; i < 30; i++) Fill(b, i, 40 + 37 * i % 900, to, (byte)(tx == a ? i : 100 + i));   // sizes vary: no GSO runs
            b.Count = 30;
            Assert.Equal(0, tx.SendBatch(b));
        }
        var got = new List<(Endpoint From, byte[] Data)>();
        var rb = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        for (int tries = 0; tries < 200 && got.Count < 60; tries++)
        {
            rb.Count = 0;
            if (rx.ReceiveBatch(rb) == 0) { Thread.Sleep(5); continue; }
            for (int i = 0; i < rb.Count; i++) got.Add((rb.Endpoints[i], rb.Packet(i).ToArray()));
        }
        Assert.Equal(60, got.Count);
        foreach (UdpSocket tx in new[] { a, c })
        {
            var from = Endpoint.FromIp(IPAddress.Loopback, tx.LocalPort);
            List<byte[]> mine = got.FindAll(g => g.From.Equals(from)).ConvertAll(g => g.Data);
            Assert.Equal(30, mine.Count);
            for (int i = 0; i < 30; i++)
            {
                Assert.Equal(40 + 37 * i % 900, mine[i].Length);
                Assert.Equal((byte)(tx == a ? i : 100 + i), mine[i][0]);
            }
        }
    }

    [Fact]
    public void SendBatch_Ipv6PeerOnIpv4Socket_RefusedAlone()
    {
        using UdpSocket tx = UdpSocket.Bind(IPAddress.Loopback, 0), rx = UdpSocket.Bind(IPAddress.Loopback, 0);
        var to = Endpoint.FromIp(IPAddress.Loopback, rx.LocalPort);
        var b = new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        for (int i = 0; i < 5; i++) Fill(b, i, 500, i == 2 ? Endpoint.FromIp(IPAddress.Parse("2001:db8::1"), 9) : to, (byte)i);
        b.Count = 5;
        Assert.Equal(1, tx.SendBatch(b));
        Assert.Equal(4, ReceiveAll(rx, 4).Count);
    }
}
