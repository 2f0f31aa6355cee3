using System.Buffers.Binary;
using System.Collections.Concurrent;

namespace Veil.Tests;

/// <summary>Several workers on one node, on their own threads: the node's lock must keep every
/// nonce, replay mark and counter exact.</summary>
public class WorkerTests
{
    // Thread-safe stand-ins for one TUN queue and one socket (the batch calls are the interfaces'
    // one-at-a-time defaults): what to read is queued up front, what is written or sent is collected.
    private sealed class QueueTun : IDataplane
    {
        internal readonly ConcurrentQueue<byte[]> ToRead = new(), Written = new();
        public int Fd => -1;
        public int Read(Span<byte> buffer)
        {
            if (!ToRead.TryDequeue(out byte[]? p)) return 0;
            p.CopyTo(buffer);
            return p.Length;
        }
        public bool Write(ReadOnlySpan<byte> packet) { Written.Enqueue(packet.ToArray()); return true; }
        public void Dispose() { }
    }

    private sealed class QueueUdp : IUdp
    {
        internal readonly ConcurrentQueue<(byte[] Data, Endpoint From)> ToReceive = new();
        internal readonly ConcurrentQueue<byte[]> Sent = new();
        public int Fd => -1;
        public int LocalPort => 51820;
        public int Receive(Span<byte> buffer, out Endpoint from)
        {
            from = default;
            if (!ToReceive.TryDequeue(out var d)) return 0;
            d.Data.CopyTo(buffer);
            from = d.From;
            return d.Data.Length;
        }
        public bool Send(ReadOnlySpan<byte> datagram, in Endpoint to) { Sent.Enqueue(datagram.ToArray()); return true; }
        public void Dispose() { }
    }

    private static void OnThreads(int count, Action<int> body)
    {
        var threads = new Thread[count];
        using var start = new ManualResetEventSlim();
        for (int w = 0; w < count; w++)
        {
            int id = w;
            threads[w] = new Thread(() => { start.Wait(); body(id); });
            threads[w].Start();
        }
        start.Set();
        foreach (Thread t in threads) Assert.True(t.Join(TimeSpan.FromSeconds(60)), "a worker thread hung");
    }

    [Fact]
    public void ThreeWorkersPerNode_BothWaysAtOnce_EveryPacketOnceIntact_CountersExact()
    {
        const int Workers = 3, PerWorker = 1200;             // 3,600 records: within one replay window
        var t = TestNet.FullMesh(2);
        Assert.Equal(1, t.Send(0, 1));                      // a session, confirmed by its first record
        Assert.Equal(1, t.Send(1, 0));
        Node a = t.Nodes[0].Node, b = t.Nodes[1].Node;
        long txA = a.Counters.TxRecords, rxB = b.Counters.RxRecords, tunRxA = a.Counters.TunRxPackets, tunTxB = b.Counters.TunTxPackets;
        var tunA = new QueueTun[Workers]; var udpA = new QueueUdp[Workers]; var wa = new Worker[Workers];
        var tunB = new QueueTun[Workers]; var udpB = new QueueUdp[Workers]; var wb = new Worker[Workers];
        for (int w = 0; w < Workers; w++)
        {
            wa[w] = new Worker(a, tunA[w] = new QueueTun(), udpA[w] = new QueueUdp());
            wb[w] = new Worker(b, tunB[w] = new QueueTun(), udpB[w] = new QueueUdp());
            for (int i = 0; i < PerWorker; i++)
            {
                byte[] p = Packets.Udp4("100.64.0.1", "100.64.0.2", 100 + i % 300);
                BinaryPrimitives.WriteInt32BigEndian(p.AsSpan(28), w * PerWorker + i);   // which packet this is
                tunA[w].ToRead.Enqueue(p);
            }
        }
        long now = t.NowMs;
        // a: three threads read their TUN queues and seal at once
        OnThreads(Workers, w => { while (!tunA[w].ToRead.IsEmpty) wa[w].PumpTun(now); });
        var records = udpA.SelectMany(u => u.Sent).ToList();
        Assert.Equal(Workers * PerWorker, records.Count);
        // b: the records spread over three sockets, opened by three threads at once
        for (int i = 0; i < records.Count; i++) udpB[i % Workers].ToReceive.Enqueue((records[i], t.Nodes[0].Endpoint));
        OnThreads(Workers, w => { while (!udpB[w].ToReceive.IsEmpty) wb[w].PumpUdp(now); });

        var seen = new HashSet<int>();
        foreach (byte[] p in tunB.SelectMany(q => q.Written))
        {
            int id = BinaryPrimitives.ReadInt32BigEndian(p.AsSpan(28));
            Assert.True(seen.Add(id), $"packet {id} delivered twice");
            Assert.Equal(28 + 100 + id % PerWorker % 300, p.Length);
        }
        Assert.Equal(Workers * PerWorker, seen.Count);
        lock (a.Gate) foreach (Worker w in wa) w.Settle();
        lock (b.Gate) foreach (Worker w in wb) w.Settle();
        Assert.Equal(Workers * PerWorker, a.Counters.TunRxPackets - tunRxA);
        Assert.Equal(Workers * PerWorker, a.Counters.TxRecords - txA);
        Assert.Equal(Workers * PerWorker, b.Counters.RxRecords - rxB);
        Assert.Equal(Workers * PerWorker, b.Counters.TunTxPackets - tunTxB);
        Assert.Equal(0, b.Counters.Drops.Sum());
        Assert.Equal(Workers * PerWorker, wa.Sum(w => w.TunPackets));
        Assert.Equal(Workers * PerWorker, wb.Sum(w => w.UdpDatagrams));
    }

    // Only the loop's thread runs the timers, and it sleeps until the earliest it knows of. A timer
    // armed on another worker's thread earlier than that wakes the loop (once); one armed later, or
    // a second packet that arms nothing new, does not.
    [Fact]
    public void OtherWorker_ArmingAnEarlierTimer_WakesTheLoopOnce()
    {
        var t = TestNet.FullMesh(2);
        Node a = t.Nodes[0].Node;
        Peer b = a.Peers[0];
        long now = t.NowMs;
        lock (a.Gate) t.Nodes[0].Worker.PumpTimers(now);               // the loop goes to sleep
        Assert.Equal(0, b.RetransmitHandshakeAtMs);
        int wakes = 0;
        var tun = new QueueTun();
        var other = new Worker(a, tun, new QueueUdp()) { WakeLoop = () => Interlocked.Increment(ref wakes) };
        tun.ToRead.Enqueue(Packets.Udp4("100.64.0.1", "100.64.0.2", 100));
        other.PumpTun(now);                                             // no session: a ClientHello and its retransmit timer
        Assert.NotEqual(0, b.RetransmitHandshakeAtMs);
        Assert.Equal(1, wakes);
        tun.ToRead.Enqueue(Packets.Udp4("100.64.0.1", "100.64.0.2", 100));
        other.PumpTun(now + 1);                                         // staged behind the same handshake: nothing new
        Assert.Equal(1, wakes);
        long next;
        lock (a.Gate) next = t.Nodes[0].Worker.PumpTimers(now + 1);    // the loop, woken, learns the deadline
        Assert.Equal(b.RetransmitHandshakeAtMs, next);
        Assert.Equal(next, a.Signal.LoopWakeMs);
        Assert.False(a.Signal.Pending);
        lock (a.Gate) b.ZeroKeysAtMs = next + 1;                       // later than the loop's wake-up: no news
        Assert.False(a.Signal.Pending);
        lock (a.Gate) b.ZeroKeysAtMs = next - 1;
        Assert.True(a.Signal.Pending);
    }
}
