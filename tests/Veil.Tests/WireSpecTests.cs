using System.Buffers.Binary;
using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using System.Text.RegularExpressions;

namespace Veil.Tests;

/// <summary>README "Wire protocol" is the specification. These tests read its tables and rules (offsets,
/// literal bytes, flag values, AEAD ids, the mask's constants, the padding formula, the limits) and
/// check the daemon's messages against them, with an encoder and decoder of their own written from the
/// document and the base library's AEADs. A change of the wire or of the document fails here until both
/// agree again.</summary>
public class WireSpecTests
{
    // ---- the document ----

    private static readonly string Doc = ReadSection();

    private static string ReadSection()
    {
        string readme = File.ReadAllText(Path.Combine(Vectors.Dir, "..", "..", "README.md"));
        int a = readme.IndexOf("\n## Wire protocol", StringComparison.Ordinal);
        int b = readme.IndexOf("\n## ", a + 5, StringComparison.Ordinal);
        Assert.True(a >= 0 && b > a, "README has no Wire protocol section");
        return readme[a..b];
    }

    /// <summary>The rows of the first table after the line that starts with caption (header and rule skipped).</summary>
    private static List<string[]> Table(string caption)
    {
        string[] lines = Doc.Split('\n');
        int i = Array.FindIndex(lines, l => l.StartsWith(caption, StringComparison.Ordinal));
        Assert.True(i >= 0, $"no table captioned '{caption}' in README");
        while (!lines[i].StartsWith('|')) i++;
        var rows = new List<string[]>();
        for (i += 2; i < lines.Length && lines[i].StartsWith('|'); i++)
            rows.Add(lines[i].Trim().Trim('|').Split('|').Select(c => c.Trim()).ToArray());
        return rows;
    }

    private sealed record Field(int Offset, int Len, string Text);

    /// <summary>An "offset | len | field" table: rows in order, contiguous from 0, summing to the caption's "N bytes".</summary>
    private static List<Field> Layout(string caption)
    {
        var fields = Table(caption).Select(r => new Field(int.Parse(r[0]), int.Parse(r[1]), r[2])).ToList();
        int at = 0;
        foreach (Field f in fields) { Assert.Equal(at, f.Offset); at += f.Len; }
        Assert.Equal(CaptionLen(caption), at);
        return fields;
    }

    /// <summary>The document states this sentence (line breaks and indentation aside).</summary>
    private static void Says(string sentence) =>
        Assert.True(Regex.Replace(Doc, @"\s+", " ").Contains(sentence, StringComparison.Ordinal), $"README Wire protocol no longer says: {sentence}");

    private static int CaptionLen(string caption) => int.Parse(Regex.Match(caption, @"(\d+) bytes").Groups[1].Value);

    private static Field Row(List<Field> fields, string startsWith) =>
        fields.Single(f => f.Text.StartsWith(startsWith, StringComparison.Ordinal));

    /// <summary>The bytes of the first `hex hex ...` literal in a cell.</summary>
    private static byte[] Literal(string cell) =>
        Convert.FromHexString(Regex.Match(cell, "`([0-9a-f]{2}(?: [0-9a-f]{2})*)`").Groups[1].Value.Replace(" ", ""));

    /// <summary>The byte a cell gives a name: "`02` ChaCha20-Poly1305" gives ChaCha20-Poly1305 0x02.</summary>
    private static byte Named(string cell, string name) =>
        Convert.FromHexString(Regex.Match(cell, "`([0-9a-f]{2})` " + Regex.Escape(name)).Groups[1].Value)[0];

    private static int Number(string pattern) => int.Parse(Regex.Match(Doc, pattern).Groups[1].Value.Replace(",", ""), CultureInfo.InvariantCulture);

    private static byte[] Hmac16(ReadOnlySpan<byte> key, ReadOnlySpan<byte> data) => HMACSHA256.HashData(key, data)[..16];

    private static byte[] MacKey(string label, in Key32 pub)
    {
        ReadOnlySpan<byte> k = pub;
        return SHA256.HashData([.. Encoding.ASCII.GetBytes(label), .. k]);
    }

    private static byte[] Pub(byte seed) => HandshakeTests.B(TestNet.PublicOf(TestNode.KeyFromSeed(seed)));

    // ---- handshake messages ----

    [Theory]
    [InlineData("ClientHello, 154 bytes:", Wire.ClientHelloLen)]
    [InlineData("ServerHello, 102 bytes:", Wire.ServerHelloLen)]
    [InlineData("CookieReply, 54 bytes:", Wire.CookieReplyLen)]
    [InlineData("ClientHello payload, 16 bytes:", Wire.ClientHelloPayloadLen)]
    [InlineData("ServerHello payload, 8 bytes:", Wire.ServerHelloPayloadLen)]
    public void Tables_AreContiguousAndAsLongAsTheMessages(string caption, int len)
    {
        Layout(caption);
        Assert.Equal(len, CaptionLen(caption));
    }

    [Fact]
    public void ClientHello_EveryFieldWhereTheTableSays()
    {
        var p = new HandshakeTests.Pair();
        byte[] hello = HandshakeTests.Golden(p, out _, out _, out _, out _);
        List<Field> t = Layout("ClientHello, 154 bytes:");
        Assert.Equal(Literal(t[0].Text), hello[..5]);
        Assert.Equal(Literal(Row(t, "type").Text), hello.AsSpan(Row(t, "type").Offset, 1).ToArray());
        Assert.Equal(0x11223344u, BinaryPrimitives.ReadUInt32BigEndian(hello.AsSpan(Row(t, "sender index").Offset)));
        Field e = Row(t, "ephemeral public key");
        Assert.Equal(Pub(3), hello.AsSpan(e.Offset, e.Len).ToArray());
        Field mac1 = Row(t, "MAC1"), mac2 = Row(t, "MAC2");
        Assert.Equal(Hmac16(MacKey("mac1----", p.R.Handshaker.PublicKey), hello.AsSpan(0, mac1.Offset)), hello.AsSpan(mac1.Offset, mac1.Len).ToArray());
        Assert.Equal(new byte[mac2.Len], hello.AsSpan(mac2.Offset, mac2.Len).ToArray());
        Assert.Equal((Wire.ClientHelloSenderOffset, Wire.ClientHelloEphemeralOffset, Wire.ClientHelloMac1Offset, Wire.ClientHelloMac2Offset),
            (Row(t, "sender index").Offset, e.Offset, mac1.Offset, mac2.Offset));
    }

    [Fact]
    public void ClientHelloPayload_TimestampAndAeadsAsTheTableSays()
    {
        var p = new HandshakeTests.Pair();
        byte[] hello = HandshakeTests.Golden(p, out _, out _, out _, out _);
        var st = new HelloState();
        var fresh = new HandshakeTests.Pair();
        Assert.Equal(HandshakeVerdict.Ok, fresh.R.Handshaker.ConsumeClientHello(hello, TestNet.Ep(0), 0, st));
        List<Field> t = Layout("ClientHello payload, 16 bytes:");
        Assert.StartsWith("TAI64N timestamp: 2^62 + Unix seconds (8), nanoseconds (4)", Row(t, "TAI64N").Text);
        long s = HandshakeTests.GoldenUnixNs / 1_000_000_000, ns = HandshakeTests.GoldenUnixNs % 1_000_000_000;
        Assert.Equal((1UL << 62) + (ulong)s, BinaryPrimitives.ReadUInt64BigEndian(st.Timestamp));
        Assert.Equal((uint)ns, BinaryPrimitives.ReadUInt32BigEndian(st.Timestamp.AsSpan(8)));
        string mask = Row(t, "AEAD mask").Text, id = Row(t, "preferred AEAD id").Text;
        byte chachaBit = Named(mask, "ChaCha20-Poly1305"), aesBit = Named(mask, "AES-256-GCM");
        Assert.Equal((byte)(chachaBit | aesBit), st.AeadMask);                 // the golden pair offers both
        Assert.Equal(Named(id, "ChaCha20-Poly1305"), st.PreferredAead);         // and prefers ChaCha20-Poly1305
        Assert.Equal((byte)AeadKind.ChaCha20Poly1305, Named(id, "ChaCha20-Poly1305"));
        Assert.Equal((byte)AeadKind.Aes256Gcm, Named(id, "AES-256-GCM"));
        // one cipher named: that AEAD's bit alone, and it is the preferred one
        foreach ((string flag, string name) in new[] { ("chacha20-poly1305", "ChaCha20-Poly1305"), ("aes-256-gcm", "AES-256-GCM") })
        {
            var q = new HandshakeTests.Pair();
            q.I.Handshaker.ChooseCipher(flag);
            byte[] h = new byte[Wire.ClientHelloLen];
            q.I.Handshaker.CreateClientHello(q.IPeer, 1, HandshakeTests.GoldenUnixNs, 0, h);
            var qs = new HelloState();
            Assert.Equal(HandshakeVerdict.Ok, q.R.Handshaker.ConsumeClientHello(h, TestNet.Ep(0), 0, qs));
            Assert.Equal(Named(mask, name), qs.AeadMask);
            Assert.Equal(Named(id, name), qs.PreferredAead);
        }
    }

    [Fact]
    public void ServerHello_EveryFieldAndThePayloadAsTheTablesSay()
    {
        var p = new HandshakeTests.Pair();
        HandshakeTests.Golden(p, out byte[] sh, out _, out _, out _);
        List<Field> t = Layout("ServerHello, 102 bytes:");
        Assert.Equal(Literal(t[0].Text), sh[..5]);
        Assert.Equal(Literal(Row(t, "type").Text), sh.AsSpan(Row(t, "type").Offset, 1).ToArray());
        Assert.Equal(0x55667788u, BinaryPrimitives.ReadUInt32BigEndian(sh.AsSpan(Row(t, "sender index").Offset)));
        Assert.Equal(0x11223344u, BinaryPrimitives.ReadUInt32BigEndian(sh.AsSpan(Row(t, "receiver index").Offset)));
        Field e = Row(t, "ephemeral public key"), enc = Row(t, "encrypted payload"), mac1 = Row(t, "MAC1");
        Assert.Equal(Pub(4), sh.AsSpan(e.Offset, e.Len).ToArray());
        Assert.Equal(Hmac16(MacKey("mac1----", p.I.Handshaker.PublicKey), sh.AsSpan(0, mac1.Offset)), sh.AsSpan(mac1.Offset, mac1.Len).ToArray());
        Assert.Equal((Wire.ServerHelloSenderOffset, Wire.ServerHelloReceiverOffset, Wire.ServerHelloEphemeralOffset, Wire.ServerHelloMac1Offset),
            (Row(t, "sender index").Offset, Row(t, "receiver index").Offset, e.Offset, mac1.Offset));

        // the payload, read with the initiator's pending handshake
        Handshake hs = p.IPeer.Pending!;
        var trial = new NoiseState { Ck = hs.Noise.Ck, H = hs.Noise.H, K = hs.Noise.K, N = hs.Noise.N };
        byte[] payload = new byte[Wire.ServerHelloPayloadLen];
        Assert.True(trial.ReadMessage2(hs.EphemeralPrivate, p.I.Handshaker.PrivateKey, p.IPeer.Psk, sh.AsSpan(e.Offset, e.Len + enc.Len), payload));
        List<Field> pt = Layout("ServerHello payload, 8 bytes:");
        Assert.Equal(Named(Table("ClientHello payload, 16 bytes:").Single(r => r[2].StartsWith("preferred AEAD id"))[2], "ChaCha20-Poly1305"), payload[Row(pt, "chosen AEAD id").Offset]);
        Assert.Equal(Literal(Row(pt, "the responder's padding block").Text), payload.AsSpan(Row(pt, "the responder's padding block").Offset, 1).ToArray());
        Assert.Equal(Literal(Row(pt, "the responder's passive keepalive").Text), payload.AsSpan(Row(pt, "the responder's passive keepalive").Offset, 2).ToArray());
        Assert.Equal(Spec.PadBlockLen, Literal(Row(pt, "the responder's padding block").Text)[0]);
        Field reserved = Row(pt, "reserved");
        Assert.Equal(new byte[reserved.Len], payload.AsSpan(reserved.Offset, reserved.Len).ToArray());
    }

    [Fact]
    public void AeadChoice_FollowsTheDocumentedOrder()
    {
        // "the initiator's preferred one, then its own preferred one, then ChaCha20-Poly1305, then AES-256-GCM"
        Says("among those both masks hold: the initiator's preferred one, then its own preferred one, then ChaCha20-Poly1305, then AES-256-GCM. With no AEAD in common the ClientHello is not answered.");
        AeadKind[] kinds = [AeadKind.ChaCha20Poly1305, AeadKind.Aes256Gcm];
        int cases = 0;
        foreach (byte iMask in new byte[] { 2, 4, 6 })
        foreach (AeadKind iPref in kinds)
        foreach (byte rMask in new byte[] { 2, 4, 6 })
        foreach (AeadKind rPref in kinds)
        {
            if ((iMask & (1 << (int)iPref)) == 0 || (rMask & (1 << (int)rPref)) == 0) continue;
            int common = iMask & rMask;
            AeadKind want = 0;
            foreach (AeadKind k in new[] { iPref, rPref, AeadKind.ChaCha20Poly1305, AeadKind.Aes256Gcm })
                if (want == 0 && (common & (1 << (int)k)) != 0) want = k;
            var p = new HandshakeTests.Pair();
            (p.I.Handshaker.AeadMask, p.I.Handshaker.PreferredAead) = (iMask, iPref);
            (p.R.Handshaker.AeadMask, p.R.Handshaker.PreferredAead) = (rMask, rPref);
            byte[] h = new byte[Wire.ClientHelloLen], sh = new byte[Wire.ServerHelloLen];
            p.I.Handshaker.CreateClientHello(p.IPeer, 1, HandshakeTests.GoldenUnixNs, 0, h);
            var st = new HelloState();
            Assert.Equal(HandshakeVerdict.Ok, p.R.Handshaker.ConsumeClientHello(h, TestNet.Ep(0), 0, st));
            int len = p.R.Handshaker.CreateServerHello(st, 2, 0, sh, out SessionKeys? keys);
            if (want == 0) Assert.Equal(0, len);                     // no AEAD in common: not answered
            else
            {
                Assert.Equal(want, keys!.Aead);
                Assert.Equal(HandshakeVerdict.Ok, p.I.Handshaker.ConsumeServerHello(sh, p.IPeer, out SessionKeys? ik));
                Assert.Equal(want, ik!.Aead);
            }
            cases++;
        }
        Assert.Equal(16, cases);                  // 4 (mask, preference) choices a side
    }

    [Fact]
    public void CookieReplyAndMac2_AsTheDocumentSays()
    {
        var p = new HandshakeTests.Pair();
        byte[] hello = HandshakeTests.Golden(p, out _, out _, out _, out _);
        byte[] cookie = RandomNumberGenerator.GetBytes(16), reply = new byte[Wire.CookieReplyLen];
        Assert.Equal(Wire.CookieReplyLen, p.R.Handshaker.CreateCookieReply(hello, cookie, reply));
        List<Field> t = Layout("CookieReply, 54 bytes:");
        Assert.Equal(Literal(t[0].Text), reply[..5]);
        Assert.Equal(Literal(Row(t, "type").Text), reply.AsSpan(Row(t, "type").Offset, 1).ToArray());
        Assert.Equal(hello.AsSpan(Wire.ClientHelloSenderOffset, 4).ToArray(), reply.AsSpan(Row(t, "receiver index").Offset, 4).ToArray());
        Field nonce = Row(t, "nonce"), sealedCookie = Row(t, "the 16-byte cookie");
        Assert.Contains("ChaCha20-Poly1305 under `SHA-256(\"cookie--\" ‖ responder's static public key)`, the ClientHello's MAC1 as associated data", sealedCookie.Text);
        using var aead = new ChaCha20Poly1305(MacKey("cookie--", p.R.Handshaker.PublicKey));
        byte[] opened = new byte[16];
        aead.Decrypt(reply.AsSpan(nonce.Offset, nonce.Len), reply.AsSpan(sealedCookie.Offset, 16), reply.AsSpan(sealedCookie.Offset + 16, 16),
            opened, hello.AsSpan(Wire.ClientHelloMac1Offset, Spec.MacLen));
        Assert.Equal(cookie, opened);
        byte[] second = new byte[Wire.CookieReplyLen];
        p.R.Handshaker.CreateCookieReply(hello, cookie, second);
        Assert.NotEqual(reply.AsSpan(nonce.Offset, nonce.Len).ToArray(), second.AsSpan(nonce.Offset, nonce.Len).ToArray());

        // the initiator takes the cookie and keys MAC2 of its next hello with it: HMAC-SHA256(cookie, message up to MAC2)
        Assert.True(p.I.Handshaker.ConsumeCookieReply(reply, p.IPeer, 0));
        byte[] h2 = new byte[Wire.ClientHelloLen];
        p.I.Handshaker.CreateClientHello(p.IPeer, 7, HandshakeTests.GoldenUnixNs + 1, 1000, h2);
        Field mac2 = Row(Layout("ClientHello, 154 bytes:"), "MAC2");
        Assert.Equal(Hmac16(cookie, h2.AsSpan(0, mac2.Offset)), h2.AsSpan(mac2.Offset, mac2.Len).ToArray());
        // two minutes later the cookie is stale and MAC2 is zero again
        p.I.Handshaker.CreateClientHello(p.IPeer, 8, HandshakeTests.GoldenUnixNs + 2, 1000 + 120_000, h2);
        Assert.Equal(new byte[16], h2.AsSpan(mac2.Offset, mac2.Len).ToArray());
    }

    [Fact]
    public void ServerHelloMac2_IsKeyedWithACookieFromTheInitiator_ElseZero()
    {
        Says("the responder likewise fills MAC2 of its ServerHello with a cookie it holds from the initiator; nobody checks a ServerHello's MAC2");
        Field mac2 = Row(Layout("ServerHello, 102 bytes:"), "MAC2");
        var p = new HandshakeTests.Pair();
        HandshakeTests.Golden(p, out byte[] sh, out _, out _, out _);
        Assert.Equal(new byte[16], sh.AsSpan(mac2.Offset, mac2.Len).ToArray());
        var q = new HandshakeTests.Pair();
        byte[] cookie = RandomNumberGenerator.GetBytes(16);
        cookie.CopyTo(q.RPeer.Cookie, 0);
        q.RPeer.CookieReceivedMs = 0;
        HandshakeTests.Golden(q, out sh, out _, out _, out _);         // Golden checks the initiator still takes it
        Assert.Equal(Hmac16(cookie, sh.AsSpan(0, mac2.Offset)), sh.AsSpan(mac2.Offset, mac2.Len).ToArray());
    }

    // ---- transport records: an encoder and a decoder written from the document ----

    private static Dictionary<string, byte> Flags() =>
        Table("Flags:").ToDictionary(r => r[0], r => Convert.FromHexString(r[1].Trim('`'))[0]);

    /// <summary>Mix as the document writes it: the shifts and multipliers are read from the text.</summary>
    private static ulong DocMix(ulong x)
    {
        Match m = Regex.Match(Doc, @"x \^= x >> (\d+); x \*= (0x[0-9A-F]{16});\s+x \^= x >> (\d+); x \*= (0x[0-9A-F]{16});\s+x \^= x >> (\d+)");
        Assert.True(m.Success, "the Mix rule is not in README");
        int Shift(int g) => int.Parse(m.Groups[g].Value);
        ulong Mul(int g) => ulong.Parse(m.Groups[g].Value[2..], NumberStyles.HexNumber);
        x ^= x >> Shift(1); x *= Mul(2);
        x ^= x >> Shift(3); x *= Mul(4);
        return x ^ (x >> Shift(5));
    }

    private static byte[] DocNonce(ulong counter)
    {
        byte[] n = new byte[12];                                   // 4 zero bytes, then the counter little-endian
        BinaryPrimitives.WriteUInt64LittleEndian(n.AsSpan(4), counter);
        return n;
    }

    private static void DocAead(AeadKind kind, byte[] key, bool seal, byte[] nonce, Span<byte> text, Span<byte> tag, ReadOnlySpan<byte> ad)
    {
        if (kind == AeadKind.ChaCha20Poly1305)
        {
            using var c = new ChaCha20Poly1305(key);
            if (seal) c.Encrypt(nonce, text, text, tag, ad); else c.Decrypt(nonce, text, tag, text, ad);
        }
        else
        {
            using var g = new AesGcm(key, 16);
            if (seal) g.Encrypt(nonce, text, text, tag, ad); else g.Decrypt(nonce, text, tag, text, ad);
        }
    }

    private static byte[] DocSeal(AeadKind kind, byte[] key, ulong maskKey, uint receiverIndex, ulong counter, byte flags, byte[] payload, int padLen, byte padFill = 0, int claimedPadLen = -1)
    {
        int plain = payload.Length + padLen;
        byte[] r = new byte[19 + plain + 16];
        r[0] = 0x17; r[1] = 3; r[2] = 3;
        BinaryPrimitives.WriteUInt16BigEndian(r.AsSpan(3), (ushort)(r.Length - 5));
        ulong m = DocMix(maskKey + counter);
        r[5] = (byte)(flags ^ (byte)m);
        r[6] = (byte)((claimedPadLen < 0 ? padLen : claimedPadLen) ^ (byte)(m >> 8));
        BinaryPrimitives.WriteUInt32BigEndian(r.AsSpan(7), receiverIndex);
        BinaryPrimitives.WriteUInt64BigEndian(r.AsSpan(11), counter);
        payload.CopyTo(r, 19);
        r.AsSpan(19 + payload.Length, padLen).Fill(padFill);
        DocAead(kind, key, true, DocNonce(counter), r.AsSpan(19, plain), r.AsSpan(19 + plain, 16), r.AsSpan(0, 19));
        return r;
    }

    private static (byte Flags, byte[] Payload, byte[] Padding) DocOpen(AeadKind kind, byte[] key, ulong maskKey, byte[] record)
    {
        Assert.Equal(record.Length - 5, BinaryPrimitives.ReadUInt16BigEndian(record.AsSpan(3)));
        byte[] r = (byte[])record.Clone();
        ulong counter = BinaryPrimitives.ReadUInt64BigEndian(r.AsSpan(11));
        int plain = r.Length - 19 - 16;
        DocAead(kind, key, false, DocNonce(counter), r.AsSpan(19, plain), r.AsSpan(19 + plain, 16), r.AsSpan(0, 19));
        ulong m = DocMix(maskKey + counter);
        byte flags = (byte)(r[5] ^ (byte)m);
        int padLen = (byte)(r[6] ^ (byte)(m >> 8));
        return (flags, r.AsSpan(19, plain - padLen).ToArray(), r.AsSpan(19 + plain - padLen, padLen).ToArray());
    }

    [Fact]
    public void RecordTableAndFlags_MatchTheCode()
    {
        Dictionary<string, byte> flags = Flags();
        Assert.Equal(Enum.GetNames<RecordFlags>().Order(), flags.Keys.Order());
        foreach ((string name, byte v) in flags) Assert.Equal((byte)Enum.Parse<RecordFlags>(name), v);
        Assert.Equal(255, flags.Values.Aggregate(0, (a, b) => a | b));          // every bit has a meaning
        List<string[]> rows = Table("### Transport records");
        Assert.Equal(new[] { "0", "5", "6", "7", "11", "19", "19+n" }, rows.Select(r => r[0]));
        Assert.Equal((Record.FlagsOffset, Record.PadOffset, Record.IndexOffset, Record.CounterOffset, Record.HeaderLen),
            (int.Parse(rows[1][0]), int.Parse(rows[2][0]), int.Parse(rows[3][0]), int.Parse(rows[4][0]), int.Parse(rows[5][0])));
    }

    [Fact]
    public void Mix_IsTheDocumentedSplitMix64Finaliser()
    {
        var rng = new Random(11);
        for (int i = 0; i < 1000; i++)
        {
            ulong x = (ulong)rng.NextInt64() ^ ((ulong)rng.Next() << 40);
            Assert.Equal(DocMix(x), Record.Mix(x));
        }
        Assert.Equal(DocMix(ulong.MaxValue), Record.Mix(ulong.MaxValue));
    }

    [Fact]
    public void GoldenRecord_OpensWithTheDocumentsDecoder()
    {
        var p = new HandshakeTests.Pair();
        HandshakeTests.Golden(p, out _, out byte[] rec, out SessionKeys ik, out _);
        Assert.Equal(0x55667788u, BinaryPrimitives.ReadUInt32BigEndian(rec.AsSpan(7)));
        (byte flags, byte[] payload, byte[] padding) = DocOpen(AeadKind.ChaCha20Poly1305, HandshakeTests.B(ik.Send), ik.SendMaskKey, rec);
        Assert.Equal((byte)(Flags()["Data"] | Flags()["Bind"]), flags);
        Assert.Equal("veil golden record", Encoding.ASCII.GetString(payload));
        Assert.Equal(new byte[32 - 18], padding);                           // zeros up to the next multiple of 16
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    public void Records_InteroperateBothWaysWithTheDocumentsCodec(int aeadId)
    {
        var kind = (AeadKind)aeadId;
        var p = new HandshakeTests.Pair();
        (p.I.Handshaker.AeadMask, p.I.Handshaker.PreferredAead) = ((byte)(1 << (int)kind), kind);
        HandshakeTests.Golden(p, out _, out _, out SessionKeys ik, out SessionKeys rk);
        Assert.Equal(kind, ik.Aead);
        var sender = new Session(p.IPeer, HandshakeTests.CopyKeys(ik), 0);
        byte[] key = HandshakeTests.B(ik.Send);
        byte data = Flags()["Data"];
        // the daemon seals, the document opens; the counter is big-endian in the header, little-endian in the nonce
        for (int n = 0; n < 3; n++)
        {
            byte[] slot = new byte[256];
            byte[] msg = Encoding.ASCII.GetBytes($"record {n} under {kind}");
            msg.CopyTo(slot, Record.PayloadOffset);
            int len = Record.Seal(sender, slot, msg.Length, RecordFlags.Data, 1420);
            Assert.Equal((ulong)n, BinaryPrimitives.ReadUInt64BigEndian(slot.AsSpan(11)));
            (byte f, byte[] got, _) = DocOpen(kind, key, ik.SendMaskKey, slot[..len]);
            Assert.Equal(data, f);
            Assert.Equal(msg, got);
        }
        // the document seals, the daemon opens; what a receiver checks
        var receiver = new Session(p.RPeer, rk, 0);
        byte[] payload = Encoding.ASCII.GetBytes("from the document");
        Assert.Equal(OpenVerdict.Ok, Open(receiver, DocSeal(kind, key, ik.SendMaskKey, rk.LocalIndex, 10, data, payload, 15), out byte[] opened, out RecordFlags of));
        Assert.Equal(payload, opened);
        Assert.Equal(RecordFlags.Data, of);
        // padding bytes are not looked at (they are authenticated)
        Assert.Equal(OpenVerdict.Ok, Open(receiver, DocSeal(kind, key, ik.SendMaskKey, rk.LocalIndex, 11, data, payload, 15, padFill: 0xAA), out opened, out _));
        Assert.Equal(payload, opened);
        // a padding length past the plaintext, or an unknown flag, is malformed
        Assert.Equal(OpenVerdict.Malformed, Open(receiver, DocSeal(kind, key, ik.SendMaskKey, rk.LocalIndex, 12, data, payload, 15, claimedPadLen: 33), out _, out _));
        Assert.Equal(OpenVerdict.Malformed, Open(receiver, DocSeal(kind, key, ik.SendMaskKey, rk.LocalIndex, 13, (byte)(data | 0x80), payload, 15), out _, out _));
        // a nonce written big-endian (Noise's AESGCM) does not open
        byte[] r = DocSeal(kind, key, ik.SendMaskKey, rk.LocalIndex, 14, data, payload, 15);
        byte[] be = new byte[12];
        BinaryPrimitives.WriteUInt64BigEndian(be.AsSpan(4), 14);
        byte[] text = r.AsSpan(19, r.Length - 35).ToArray();
        byte[] plain = new byte[text.Length];
        Assert.ThrowsAny<CryptographicException>(() =>
        {
            if (kind == AeadKind.ChaCha20Poly1305) { using var c = new ChaCha20Poly1305(key); c.Decrypt(be, text, r.AsSpan(r.Length - 16).ToArray(), plain, r.AsSpan(0, 19).ToArray()); }
            else { using var g = new AesGcm(key, 16); g.Decrypt(be, text, r.AsSpan(r.Length - 16).ToArray(), plain, r.AsSpan(0, 19).ToArray()); }
        });
    }

    private static OpenVerdict Open(Session s, byte[] record, out byte[] payload, out RecordFlags flags)
    {
        OpenVerdict v = Record.Open(s, record, out int len, out flags);
        payload = v == OpenVerdict.Ok ? record.AsSpan(Record.PayloadOffset, len).ToArray() : [];
        return v;
    }

    [Fact]
    public void Padding_FollowsTheDocumentedFormulaAtEveryLength()
    {
        Says("`max(n, min(roundup16(n), MTU))`");
        foreach (int mtu in new[] { Tune.MinMtu, Tune.DefaultMtu, 1421, Tune.MaxMtu })
            for (int n = 0; n <= Math.Min(mtu + 64, Tune.SlotLen - Record.OverheadLen - 16); n++)
            {
                int want = Math.Max(n, Math.Min((n + 15) / 16 * 16, mtu));
                Assert.Equal(want, Record.PaddedLen(n, mtu));
            }
        Assert.Equal(1420, Record.PaddedLen(1415, 1420));                // the edge: the MTU, not 1424
        Assert.Equal(1430, Record.PaddedLen(1430, 1420));                // longer than the MTU: not padded
    }

    // ---- the rules that need two nodes ----

    private static byte[]? FirstTransport(List<byte[]> sent) => sent.FirstOrDefault(d => d[0] == Spec.TlsApplicationData);

    /// <summary>Two nodes, not started; the records a sends are caught (not delivered) for the test to
    /// read with b's Next session.</summary>
    private static (TestNet T, List<byte[]> Caught) CatchRecordsFromA()
    {
        var t = TestNet.FullMesh(2);
        var caught = new List<byte[]>();
        Endpoint a = TestNet.Ep(0);
        t.Net.Filter = (from, to, d) =>
        {
            if (from.Equals(a) && d[0] == Spec.TlsApplicationData) { caught.Add(d); return false; }
            return true;
        };
        return (t, caught);
    }

    [Fact]
    public void Bind_EmptyIs0a_WithWaitingPacketsIs09_AndAnyRecordConfirmsNext()
    {
        Dictionary<string, byte> f = Flags();
        Says("`09` (Data + Bind) when packets were waiting for the session, else an empty `0a` (Keepalive + Bind)");
        Says("the responder confirms its Next session on *any* record that authenticates under it, Bind or not");

        // no packet waiting: an empty Keepalive + Bind
        var (t, caught) = CatchRecordsFromA();
        Peer ab = TestNet.PeerOf(t.Nodes[0], t.Nodes[1]), ba = TestNet.PeerOf(t.Nodes[1], t.Nodes[0]);
        t.StartNode(t.Nodes[0]);                     // a's hello; b (not started) only answers
        t.Pump();
        Assert.NotEmpty(caught);                     // the Bind first (the exchange's Self may follow)
        Session next = ba.Next!;
        Assert.False(next.Confirmed);
        Assert.Equal(OpenVerdict.Ok, Open(next, caught[0], out byte[] payload, out RecordFlags flags));
        Assert.Equal((byte)(f["Keepalive"] | f["Bind"]), (byte)flags);
        Assert.Empty(payload);

        // the Bind was lost: a's next record, Data without Bind, confirms b's Next all the same
        t.Net.Filter = null;
        Assert.Equal(1, t.Send(0, 1));
        Assert.Same(next, ba.Current);
        Assert.True(next.Confirmed);

        // a packet waiting for the session: it travels in the Bind, Data + Bind
        var (u, caught2) = CatchRecordsFromA();
        u.Nodes[0].Tun.Inject(Packets.Udp4(u.Nodes[0].Overlay, u.Nodes[1].Overlay, 40));
        u.Pump();
        Session next2 = TestNet.PeerOf(u.Nodes[1], u.Nodes[0]).Next!;
        Assert.Equal(OpenVerdict.Ok, Open(next2, caught2[0], out payload, out flags));
        Assert.Equal((byte)(f["Data"] | f["Bind"]), (byte)flags);
        Assert.Equal(28 + 40, payload.Length);
    }

    [Fact]
    public void RetransmittedHello_RepeatsForFiveSeconds_ThenIsANewMessage()
    {
        Says("a retransmit within 5 s (RekeyTimeout) of a hello's first copy sends the same message again, byte for byte but for MAC2");
        Says("A retransmit 5 s or more after the first copy is a new message (new ephemeral key, new sender index, newer timestamp)");
        var t = TestNet.FullMesh(2);
        var hellos = new List<(long AtMs, byte[] Msg)>();
        Endpoint a = TestNet.Ep(0);
        t.Net.Filter = (from, to, d) =>
        {
            if (from.Equals(a) && Record.Classify(d) == RecordKind.ClientHello) { hellos.Add((t.NowMs, d)); return false; }
            return true;
        };
        Peer ab = TestNet.PeerOf(t.Nodes[0], t.Nodes[1]);
        long start = t.NowMs;
        t.Nodes[0].Node.StartHandshake(ab, t.NowMs, retransmit: false);
        t.Nodes[0].Worker.FlushUdp(t.Nodes[0].Node.UdpOut);
        t.AdvanceUntil(() => hellos.Count >= 4, 12_000);
        Assert.Equal(4, hellos.Count);                 // at 0, 1, 3 s (copies) and 7 s (new)
        Assert.All(hellos.Take(3), h => Assert.True(h.AtMs - start < Spec.RekeyTimeoutMs));
        Assert.True(hellos[3].AtMs - start >= Spec.RekeyTimeoutMs);
        Assert.Equal(hellos[0].Msg, hellos[1].Msg);    // no cookie here: MAC2 is zero in all copies
        Assert.Equal(hellos[0].Msg, hellos[2].Msg);
        byte[] h1 = hellos[0].Msg, h4 = hellos[3].Msg;
        Assert.NotEqual(h1.AsSpan(Wire.ClientHelloSenderOffset, 4).ToArray(), h4.AsSpan(Wire.ClientHelloSenderOffset, 4).ToArray());
        Assert.NotEqual(h1.AsSpan(Wire.ClientHelloEphemeralOffset, 32).ToArray(), h4.AsSpan(Wire.ClientHelloEphemeralOffset, 32).ToArray());
        Assert.Equal(2, t.Nodes[0].Node.Counters.HellosRepeated);
        // b answers the first hello late: a forgot its index
        int before = t.Drops(0, DropReason.UnknownIndex);
        t.Nodes[1].Udp.Deliver(h1, a);
        t.Pump();
        Assert.Equal(before + 1, t.Drops(0, DropReason.UnknownIndex));
        Assert.Null(ab.Current);
        // the newer hello is answered and completes (its timestamp is newer than the first's)
        t.Nodes[1].Udp.Deliver(h4, a);
        t.Pump();
        Assert.NotNull(ab.Current);
    }

    [Fact]
    public void LateAnswerToTheFirstCopy_CompletesTheHandshake()
    {
        var t = TestNet.FullMesh(2);
        var answers = new List<byte[]>();
        Endpoint b = TestNet.Ep(1);
        t.Net.Filter = (from, to, d) =>
        {
            if (from.Equals(b) && Record.Classify(d) == RecordKind.ServerHello) { answers.Add(d); return false; }
            return true;
        };
        Peer ab = TestNet.PeerOf(t.Nodes[0], t.Nodes[1]);
        t.Nodes[0].Node.StartHandshake(ab, t.NowMs, retransmit: false);
        t.Nodes[0].Worker.FlushUdp(t.Nodes[0].Node.UdpOut);
        t.AdvanceUntil(() => answers.Count >= 2, 3_000);
        Assert.Equal(2, answers.Count);
        Assert.Equal(answers[0], answers[1]);          // b sent its answer again to the copy
        Assert.Equal(1, t.Nodes[1].Node.Counters.AnswersRepeated);
        Assert.Equal(1, t.Nodes[0].Node.Counters.HandshakesInitiated);
        t.Nodes[0].Udp.Deliver(answers[0], b);         // the first answer, late
        t.Pump();
        Assert.NotNull(ab.Current);
        t.Nodes[0].Udp.Deliver(answers[1], b);         // and its copy: nothing pending any more
        t.Pump();
        Assert.Equal(1, t.Nodes[0].Node.Counters.HandshakesCompleted);
    }

    // ---- limits in the exchange and the replay window ----

    [Fact]
    public void ExchangeLimits_AreTheCodes()
    {
        List<string[]> rows = Table("| message | layout |");
        string Layout(string m) => rows.Single(r => r[0] == m)[1];
        int Max(string layout, string field) => int.Parse(Regex.Match(layout, @"(?<![A-Za-z])" + Regex.Escape(field) + @" \((?:≤ |\d+–)(\d+)\)").Groups[1].Value);
        Assert.Equal(ExchangeMessage.MaxNameLen, Max(Layout("Self"), "name length"));
        Assert.Equal(Tune.MaxEndpointsPerMember, Max(Layout("Self"), "n"));
        Assert.Equal(Tune.MaxClaimsPerMember, Max(Layout("Self"), "m"));
        Assert.Equal(ExchangeMessage.MaxMembers, Max(Layout("Members"), "n"));
        Assert.Equal(Tune.MaxEndpointsPerEntry, Max(Layout("Members"), "k"));
        Assert.Equal(ExchangeMessage.MaxRevocations, Max(Layout("Revoked"), "n"));
        Assert.Equal(Tune.MaxEndpointsPerMember, Max(Layout("Punch"), "n"));
        Assert.Equal(Tune.MaxExchangeLen, Number(@"A message is at most ([\d,]+) bytes"));
        Assert.Equal(Revocation.Len, 32 + 8 + 64);
        foreach ((string name, byte type) in new[] { ("Self", ExchangeMessage.TypeSelf), ("Members", ExchangeMessage.TypeMembers), ("Revoked", ExchangeMessage.TypeRevoked),
                     ("Punch", ExchangeMessage.TypePunch), ("Ping", ExchangeMessage.TypePing), ("Pong", ExchangeMessage.TypePong) })
            Assert.Equal(Literal(Layout(name)), new[] { type });
        // one-byte counts: a Ping is type ‖ id u64, nine bytes
        byte[] ping = new byte[9];
        Assert.Equal(9, ExchangeMessage.WritePing(ping, ExchangeMessage.TypePing, 0x0102030405060708));
        Assert.Equal(Convert.FromHexString("050102030405060708"), ping);
    }

    [Fact]
    public void ReplayWindow_EdgeWhereTheDocumentPutsIt()
    {
        int size = Number(@"sliding\s+window of (\d+) counters");
        Assert.Equal(ReplayWindow.WindowSize, size);
        var w = new ReplayWindow();
        const ulong h = 100_000;
        Assert.True(w.Accept(h));
        Assert.True(w.CanAccept(h - (ulong)size + 1));                   // h - 4031: the oldest accepted
        Assert.False(w.CanAccept(h - (ulong)size));                      // h - 4032: too old
        Assert.True(w.IsTooOld(h - (ulong)size));
        Assert.True(w.Accept(h - (ulong)size + 1));
        Assert.False(w.Accept(h - (ulong)size + 1));                     // once
    }
}
