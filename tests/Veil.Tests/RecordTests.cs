using System.Buffers.Binary;

namespace Veil.Tests;

public class RecordTests
{
    private static (Session Send, Session Receive) Pair(AeadKind aead = AeadKind.ChaCha20Poly1305)
    {
        var peer = new Peer(0, new PeerConfig { PublicKey = TestNode.KeyFromSeed(5) }, default, 0, 1420);
        Key32 k1 = TestNode.KeyFromSeed(6), k2 = TestNode.KeyFromSeed(7);
        var a = new SessionKeys { Send = k1, Receive = k2, SendMaskKey = 11, ReceiveMaskKey = 22, LocalIndex = 1, RemoteIndex = 2, IsInitiator = true, Aead = aead };
        var b = new SessionKeys { Send = k2, Receive = k1, SendMaskKey = 22, ReceiveMaskKey = 11, LocalIndex = 2, RemoteIndex = 1, IsInitiator = false, Aead = aead };
        return (new Session(peer, a, 0), new Session(peer, b, 0));
    }

    private static byte[] Seal(Session s, int payloadLen, RecordFlags flags = RecordFlags.Data, int mtu = 1420, byte fill = 0xAB)
    {
        byte[] slot = new byte[Tune.SlotLen];
        slot.AsSpan(Record.PayloadOffset, payloadLen).Fill(fill);
        int len = Record.Seal(s, slot, payloadLen, flags, mtu);
        return slot[..len];
    }

    [Theory]
    [InlineData(1, 0)]
    [InlineData(1, 1)]
    [InlineData(1, 1420)]
    [InlineData(2, 17)]
    [InlineData(2, 1419)]
    public void SealOpen_RoundTrip_PayloadFlagsAndPaddingBack(int aead, int len)
    {
        var (tx, rx) = Pair((AeadKind)aead);
        byte[] rec = Seal(tx, len, RecordFlags.Data | RecordFlags.Rekey);
        Assert.Equal(RecordKind.Transport, Record.Classify(rec));
        Assert.Equal(Record.HeaderLen + Record.PaddedLen(len, 1420) + Spec.TagLen, rec.Length);
        Assert.Equal(OpenVerdict.Ok, Record.Open(rx, rec, out int got, out RecordFlags flags));
        Assert.Equal(len, got);
        Assert.Equal(RecordFlags.Data | RecordFlags.Rekey, flags);
        Assert.All(rec.AsSpan(Record.PayloadOffset, len).ToArray(), b => Assert.Equal(0xAB, b));
    }

    [Theory]
    [InlineData(0, 0)]
    [InlineData(1, 16)]
    [InlineData(16, 16)]
    [InlineData(1400, 1408)]
    [InlineData(1419, 1420)]     // padding never goes past the MTU
    [InlineData(1420, 1420)]
    public void PaddedLen_RoundsToBlockCappedAtMtu(int len, int expect) => Assert.Equal(expect, Record.PaddedLen(len, 1420));

    [Fact]
    public void MaskedHeader_DiffersBetweenIdenticalRecords()
    {
        var (tx, _) = Pair();
        var seen = new HashSet<(byte, byte)>();
        for (int i = 0; i < 64; i++)
        {
            byte[] r = Seal(tx, 100);
            seen.Add((r[Record.FlagsOffset], r[Record.PadOffset]));
        }
        Assert.True(seen.Count > 32, $"only {seen.Count} distinct masked headers in 64 records");
    }

    [Fact]
    public void Open_AnySingleBitFlip_Rejected()
    {
        var (tx, rx) = Pair();
        byte[] rec = Seal(tx, 60);
        for (int i = 0; i < rec.Length; i++)
        {
            byte[] r = (byte[])rec.Clone();
            r[i] ^= 0x04;
            Assert.NotEqual(OpenVerdict.Ok, Record.Open(rx, r, out _, out _));
        }
        Assert.Equal(OpenVerdict.Ok, Record.Open(rx, rec, out _, out _));   // the forgeries did not move the window
    }

    [Fact]
    public void Open_Truncated_RejectedNeverThrows()
    {
        var (tx, rx) = Pair();
        byte[] rec = Seal(tx, 60);
        for (int n = 0; n < rec.Length; n++)
            Assert.NotEqual(OpenVerdict.Ok, Record.Open(rx, rec.AsSpan(0, n).ToArray(), out _, out _));
    }

    [Fact]
    public void Open_Replayed_Rejected_TooOld_Rejected()
    {
        var (tx, rx) = Pair();
        byte[] first = Seal(tx, 10);
        Assert.Equal(OpenVerdict.Ok, Record.Open(rx, (byte[])first.Clone(), out _, out _));
        Assert.Equal(OpenVerdict.Replayed, Record.Open(rx, (byte[])first.Clone(), out _, out _));
        byte[] old = Seal(tx, 10);                 // counter 1, held back
        for (int i = 0; i < ReplayWindow.WindowSize + 10; i++) Assert.Equal(OpenVerdict.Ok, Record.Open(rx, Seal(tx, 0), out _, out _));
        Assert.Equal(OpenVerdict.TooOld, Record.Open(rx, old, out _, out _));
    }

    [Fact]
    public void Open_OutOfOrderInsideWindow_Accepted()
    {
        var (tx, rx) = Pair();
        var recs = Enumerable.Range(0, 100).Select(_ => Seal(tx, 20)).ToList();
        var rng = new Random(3);
        foreach (byte[] r in recs.OrderBy(_ => rng.Next())) Assert.Equal(OpenVerdict.Ok, Record.Open(rx, r, out _, out _));
    }

    [Fact]
    public void Open_WrongSessionKeys_BadAuth()
    {
        var (tx, _) = Pair();
        var (_, other) = Pair(AeadKind.Aes256Gcm);
        Assert.Equal(OpenVerdict.BadAuth, Record.Open(other, Seal(tx, 20), out _, out _));
    }

    [Theory]
    [InlineData(new byte[] { })]
    [InlineData(new byte[] { 0x17, 3, 3, 0, 0 })]
    [InlineData(new byte[] { 0x17, 3, 1, 0, 1, 0 })]
    [InlineData(new byte[] { 0x15, 3, 3, 0, 1, 0 })]
    public void Classify_ShortOrForeign_Invalid(byte[] d) => Assert.Equal(RecordKind.Invalid, Record.Classify(d));

    [Fact]
    public void Classify_LengthFieldMustMatch()
    {
        var (tx, _) = Pair();
        byte[] rec = Seal(tx, 30);
        Assert.Equal(RecordKind.Transport, Record.Classify(rec));
        Assert.Equal(RecordKind.Invalid, Record.Classify(rec.AsSpan(0, rec.Length - 1)));
        byte[] hs = new byte[Wire.ClientHelloLen];
        hs[0] = 0x16; hs[1] = 3; hs[2] = 3; hs[5] = Wire.TypeClientHello;
        BinaryPrimitives.WriteUInt16BigEndian(hs.AsSpan(3), Wire.ClientHelloLen - 5);
        Assert.Equal(RecordKind.ClientHello, Record.Classify(hs));
        hs[5] = Wire.TypeServerHello;                // right type byte, wrong size for it
        Assert.Equal(RecordKind.Invalid, Record.Classify(hs));
    }

    [Fact]
    public void SealOpen_ManyRecords_AllocateNothing()
    {
        var (tx, rx) = Pair();
        byte[] slot = new byte[Tune.SlotLen];
        void Once()
        {
            int len = Record.Seal(tx, slot, 1400, RecordFlags.Data, 1420);
            Record.Open(rx, slot.AsSpan(0, len), out _, out _);
        }
        // Warm up past tiered compilation: the runtime's own one-time allocations when it moves these
        // methods (and this loop, by on-stack replacement) to optimised code are not the path's.
        for (int i = 0; i < 20_000; i++) Once();
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 10_000; i++) Once();
        Assert.Equal(0, GC.GetAllocatedBytesForCurrentThread() - before);
    }
}
