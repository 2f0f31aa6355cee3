using System.Text.Json;

namespace Veil.Tests;

// §6 Aead: RFC 8439 §2.8.2 / A.5 (rfc_vectors.json), Wycheproof chacha20_poly1305_test.json and
// aes_gcm_test.json. Only 96-bit-nonce, 128-bit-tag groups can run through a 12-byte-nonce API;
// the rest are skipped and counted so a broken loader or filter fails a test.
public sealed class AeadTests
{
    // Counts from this copy of the files (tests/vectors/README.md, and recounted by hand).
    private const int ChaChaExecuted = 316, ChaChaValid = 256, ChaChaInvalid = 60, ChaChaSkipped = 9;
    private const int GcmExecuted = 197, GcmValid = 116, GcmInvalid = 81, GcmSkipped = 119;

    private const string ChaChaFile = "chacha20_poly1305_test.json";
    private const string GcmFile = "aes_gcm_test.json";

    // ---- RFC 8439 ----

    public static TheoryData<string, string, string, string, string, string, string> Rfc8439Vectors()
    {
        var data = new TheoryData<string, string, string, string, string, string, string>();
        using JsonDocument doc = Vectors.Load("rfc_vectors.json");
        foreach (JsonElement v in doc.RootElement.GetProperty("chacha20_poly1305_aead").GetProperty("vectors").EnumerateArray())
            data.Add(Vectors.Str(v, "section"), Vectors.Str(v, "key"), Vectors.Str(v, "nonce"), Vectors.Str(v, "aad"),
                Vectors.Str(v, "plaintext"), Vectors.Str(v, "ciphertext"), Vectors.Str(v, "tag"));
        return data;
    }

    [Fact]
    public void Rfc8439Vectors_Loaded_Two() => Assert.Equal(2, Rfc8439Vectors().Count());

    [Theory]
    [MemberData(nameof(Rfc8439Vectors))]
    public void Seal_Rfc8439Vector_GivesCiphertextThenTag(string section, string key, string nonce, string aad, string pt, string ct, string tag)
    {
        using var aead = new Aead(AeadKind.ChaCha20Poly1305, Vectors.Hex(key));
        byte[] plaintext = Vectors.Hex(pt);
        var output = new byte[plaintext.Length + Aead.TagLen];
        aead.Seal(Vectors.Hex(nonce), plaintext, Vectors.Hex(aad), output);
        Assert.Equal(ct + tag, Convert.ToHexStringLower(output));
    }

    [Theory]
    [MemberData(nameof(Rfc8439Vectors))]
    public void Open_Rfc8439Vector_GivesPlaintext(string section, string key, string nonce, string aad, string pt, string ct, string tag)
    {
        using var aead = new Aead(AeadKind.ChaCha20Poly1305, Vectors.Hex(key));
        byte[] sealedBytes = Vectors.Hex(ct + tag);
        var output = new byte[sealedBytes.Length - Aead.TagLen];
        Assert.True(aead.Open(Vectors.Hex(nonce), sealedBytes, Vectors.Hex(aad), output));
        Assert.Equal(pt, Convert.ToHexStringLower(output));
    }

    // ---- Wycheproof ----

    private sealed record AeadCase(int TcId, string Result, string Flags, string Key, string Iv, string Aad, string Msg, string Ct, string Tag);

    private sealed record AeadFile(List<AeadCase> Executed, int SkippedTests, int SkippedGroups, int DeclaredTests);

    private static readonly Lazy<AeadFile> s_chacha = new(() => LoadWycheproof(ChaChaFile));
    private static readonly Lazy<AeadFile> s_gcm = new(() => LoadWycheproof(GcmFile));

    private static AeadFile LoadWycheproof(string file)
    {
        var executed = new List<AeadCase>();
        int skippedTests = 0, skippedGroups = 0;
        using JsonDocument doc = Vectors.Load(file);
        foreach (JsonElement g in doc.RootElement.GetProperty("testGroups").EnumerateArray())
        {
            JsonElement tests = g.GetProperty("tests");
            if (g.GetProperty("ivSize").GetInt32() != 96 || g.GetProperty("tagSize").GetInt32() != 128)
            {
                skippedGroups++;
                skippedTests += tests.GetArrayLength();
                continue;
            }
            foreach (JsonElement t in tests.EnumerateArray())
                executed.Add(new AeadCase(t.GetProperty("tcId").GetInt32(), Vectors.Str(t, "result"), Vectors.Flags(t),
                    Vectors.Str(t, "key"), Vectors.Str(t, "iv"), Vectors.Str(t, "aad"), Vectors.Str(t, "msg"),
                    Vectors.Str(t, "ct"), Vectors.Str(t, "tag")));
        }
        return new AeadFile(executed, skippedTests, skippedGroups, doc.RootElement.GetProperty("numberOfTests").GetInt32());
    }

    private static TheoryData<int, string, string, string, string, string, string, string, string> ToTheory(AeadFile f)
    {
        var data = new TheoryData<int, string, string, string, string, string, string, string, string>();
        foreach (AeadCase c in f.Executed) data.Add(c.TcId, c.Result, c.Flags, c.Key, c.Iv, c.Aad, c.Msg, c.Ct, c.Tag);
        return data;
    }

    public static TheoryData<int, string, string, string, string, string, string, string, string> ChaChaCases() => ToTheory(s_chacha.Value);
    public static TheoryData<int, string, string, string, string, string, string, string, string> GcmCases() => ToTheory(s_gcm.Value);

    [Fact]
    public void WycheproofChaCha_Loaded_ExecutesAll96BitNonceCases()
    {
        AeadFile f = s_chacha.Value;
        Assert.Equal(325, f.DeclaredTests);
        Assert.Equal(ChaChaExecuted, f.Executed.Count);
        Assert.Equal(ChaChaValid, f.Executed.Count(c => c.Result == "valid"));
        Assert.Equal(ChaChaInvalid, f.Executed.Count(c => c.Result == "invalid"));
        Assert.Equal(ChaChaSkipped, f.SkippedTests);
        Assert.Equal(ChaChaSkipped, f.SkippedGroups);  // one test per odd nonce size
        Assert.Equal(f.DeclaredTests, f.Executed.Count + f.SkippedTests);
    }

    [Fact]
    public void WycheproofGcm_Loaded_ExecutesAll96BitNonceCases()
    {
        AeadFile f = s_gcm.Value;
        Assert.Equal(316, f.DeclaredTests);
        Assert.Equal(GcmExecuted, f.Executed.Count);
        Assert.Equal(GcmValid, f.Executed.Count(c => c.Result == "valid"));
        Assert.Equal(GcmInvalid, f.Executed.Count(c => c.Result == "invalid"));
        Assert.Equal(GcmSkipped, f.SkippedTests);
        Assert.Equal(f.DeclaredTests, f.Executed.Count + f.SkippedTests);
        // All three key sizes run.
        Assert.Equal(new[] { 16, 24, 32 }, f.Executed.Select(c => c.Key.Length / 2).Distinct().Order().ToArray());
    }

    [Theory]
    [MemberData(nameof(ChaChaCases))]
    public void SealOpen_WycheproofChaCha20Poly1305Case_MatchesResult(int tcId, string result, string flags, string key, string iv, string aad, string msg, string ct, string tag) =>
        CheckWycheproof(AeadKind.ChaCha20Poly1305, result, key, iv, aad, msg, ct, tag);

    [Theory]
    [MemberData(nameof(GcmCases))]
    public void SealOpen_WycheproofAesGcmCase_MatchesResult(int tcId, string result, string flags, string key, string iv, string aad, string msg, string ct, string tag) =>
        CheckWycheproof(AeadKind.Aes256Gcm, result, key, iv, aad, msg, ct, tag);

    // Each case through every implementation this machine has: AesGcmNi takes the 32-byte AES keys
    // (Fastest), libcrypto EVP and the base library all of them.
    private static void CheckWycheproof(AeadKind kind, string result, string key, string iv, string aad, string msg, string ct, string tag)
    {
        foreach (AeadImpl impl in new[] { AeadImpl.Fastest, AeadImpl.Evp, AeadImpl.BaseLibrary })
            CheckWycheproof(kind, impl, result, key, iv, aad, msg, ct, tag);
    }

    private static void CheckWycheproof(AeadKind kind, AeadImpl impl, string result, string key, string iv, string aad, string msg, string ct, string tag)
    {
        Assert.True(result is "valid" or "invalid", $"unexpected result '{result}'");
        using var aead = new Aead(kind, Vectors.Hex(key), impl);
        byte[] nonce = Vectors.Hex(iv);
        byte[] ad = Vectors.Hex(aad);
        byte[] sealedBytes = Vectors.Hex(ct + tag);
        var opened = new byte[sealedBytes.Length - Aead.TagLen];
        bool ok = aead.Open(nonce, sealedBytes, ad, opened);
        if (result == "invalid")
        {
            Assert.False(ok, "Open accepted an invalid case");
            return;
        }
        Assert.True(ok, "Open rejected a valid case");
        Assert.Equal(msg, Convert.ToHexStringLower(opened));
        byte[] plaintext = Vectors.Hex(msg);
        var output = new byte[plaintext.Length + Aead.TagLen];
        aead.Seal(nonce, plaintext, ad, output);
        Assert.Equal(ct + tag, Convert.ToHexStringLower(output));
    }

    // ---- Properties, both kinds ----

    [Theory]
    [InlineData("ChaCha20Poly1305", 0)]
    [InlineData("ChaCha20Poly1305", 1)]
    [InlineData("ChaCha20Poly1305", 1420)]
    [InlineData("Aes256Gcm", 0)]
    [InlineData("Aes256Gcm", 1)]
    [InlineData("Aes256Gcm", 1420)]
    public void SealOpen_InPlaceBuffer_RoundTripsAndMatchesOutOfPlace(string kindName, int length)
    {
        var rng = new Random(8439 + length);
        byte[] key = RandomBytes(rng, 32), nonce = RandomBytes(rng, 12), aad = RandomBytes(rng, 13), pt = RandomBytes(rng, length);
        using var aead = new Aead(Kind(kindName), key);

        var outOfPlace = new byte[length + Aead.TagLen];
        aead.Seal(nonce, pt, aad, outOfPlace);

        var buf = new byte[length + Aead.TagLen];
        pt.CopyTo(buf, 0);
        aead.Seal(nonce, buf.AsSpan(0, length), aad, buf);
        Assert.Equal(Convert.ToHexStringLower(outOfPlace), Convert.ToHexStringLower(buf));

        Assert.True(aead.Open(nonce, buf, aad, buf.AsSpan(0, length)));
        Assert.Equal(Convert.ToHexStringLower(pt), Convert.ToHexStringLower(buf.AsSpan(0, length)));
    }

    [Theory]
    [InlineData("ChaCha20Poly1305")]
    [InlineData("Aes256Gcm")]
    public void Open_AnyFlippedBitInCiphertextTagAadOrNonce_ReturnsFalse(string kindName)
    {
        var rng = new Random(1305);
        byte[] key = RandomBytes(rng, 32), nonce = RandomBytes(rng, 12), aad = RandomBytes(rng, 11), pt = RandomBytes(rng, 37);
        using var aead = new Aead(Kind(kindName), key);
        var sealedBytes = new byte[pt.Length + Aead.TagLen];
        aead.Seal(nonce, pt, aad, sealedBytes);
        var opened = new byte[pt.Length];
        Assert.True(aead.Open(nonce, sealedBytes, aad, opened));

        var accepted = new List<string>();
        for (int bit = 0; bit < sealedBytes.Length * 8; bit++)
        {
            sealedBytes[bit / 8] ^= (byte)(1 << (bit % 8));
            if (aead.Open(nonce, sealedBytes, aad, opened)) accepted.Add($"ct||tag bit {bit}");
            sealedBytes[bit / 8] ^= (byte)(1 << (bit % 8));
        }
        for (int bit = 0; bit < aad.Length * 8; bit++)
        {
            aad[bit / 8] ^= (byte)(1 << (bit % 8));
            if (aead.Open(nonce, sealedBytes, aad, opened)) accepted.Add($"aad bit {bit}");
            aad[bit / 8] ^= (byte)(1 << (bit % 8));
        }
        for (int bit = 0; bit < nonce.Length * 8; bit++)
        {
            nonce[bit / 8] ^= (byte)(1 << (bit % 8));
            if (aead.Open(nonce, sealedBytes, aad, opened)) accepted.Add($"nonce bit {bit}");
            nonce[bit / 8] ^= (byte)(1 << (bit % 8));
        }
        Assert.True(accepted.Count == 0, "Open accepted: " + string.Join("; ", accepted));
        Assert.True(aead.Open(nonce, sealedBytes, aad, opened), "the unmodified record no longer opens");
    }

    [Theory]
    [InlineData("ChaCha20Poly1305")]
    [InlineData("Aes256Gcm")]
    public void Open_TruncatedOrExtendedAad_ReturnsFalse(string kindName)
    {
        var rng = new Random(12);
        byte[] key = RandomBytes(rng, 32), nonce = RandomBytes(rng, 12), aad = RandomBytes(rng, 16), pt = RandomBytes(rng, 20);
        using var aead = new Aead(Kind(kindName), key);
        var sealedBytes = new byte[pt.Length + Aead.TagLen];
        aead.Seal(nonce, pt, aad, sealedBytes);
        var opened = new byte[pt.Length];
        Assert.False(aead.Open(nonce, sealedBytes, aad.AsSpan(0, 15), opened));
        Assert.False(aead.Open(nonce, sealedBytes, ReadOnlySpan<byte>.Empty, opened));
        Assert.False(aead.Open(nonce, sealedBytes, [.. aad, 0], opened));
    }

    [Theory]
    [InlineData("ChaCha20Poly1305")]
    [InlineData("Aes256Gcm")]
    public void Open_WrongKey_ReturnsFalse(string kindName)
    {
        var rng = new Random(99);
        byte[] key = RandomBytes(rng, 32), nonce = RandomBytes(rng, 12), pt = RandomBytes(rng, 64);
        var sealedBytes = new byte[pt.Length + Aead.TagLen];
        using (var aead = new Aead(Kind(kindName), key)) aead.Seal(nonce, pt, default, sealedBytes);
        key[31] ^= 1;
        using var other = new Aead(Kind(kindName), key);
        Assert.False(other.Open(nonce, sealedBytes, default, new byte[pt.Length]));
    }

    [Theory]
    [InlineData("ChaCha20Poly1305")]
    [InlineData("Aes256Gcm")]
    public void Open_BufferShorterThanTag_ReturnsFalse(string kindName)
    {
        using var aead = new Aead(Kind(kindName), new byte[32]);
        var nonce = new byte[12];
        var input = new byte[Aead.TagLen - 1];
        var roomy = new byte[64];
        for (int len = 0; len < Aead.TagLen; len++)
        {
            Assert.False(aead.Open(nonce, input.AsSpan(0, len), default, Span<byte>.Empty), $"length {len}, empty output");
            Assert.False(aead.Open(nonce, input.AsSpan(0, len), default, roomy), $"length {len}, 64-byte output");
        }
    }

    [Theory]
    [InlineData("ChaCha20Poly1305")]
    [InlineData("Aes256Gcm")]
    public void Open_EmptyPlaintextRecord_RoundTrips(string kindName)
    {
        using var aead = new Aead(Kind(kindName), new byte[32]);
        var nonce = new byte[12];
        var tagOnly = new byte[Aead.TagLen];
        aead.Seal(nonce, default, default, tagOnly);
        Assert.True(tagOnly.AsSpan().IndexOfAnyExcept((byte)0) >= 0, "tag of empty record is all zero");
        Assert.True(aead.Open(nonce, tagOnly, default, Span<byte>.Empty));
        tagOnly[0] ^= 0x80;
        Assert.False(aead.Open(nonce, tagOnly, default, Span<byte>.Empty));
    }

    [Fact]
    public void TagLen_Is16() => Assert.Equal(16, Aead.TagLen);

    // Theory data names the kind as text: AeadKind is internal and cannot appear in a public signature.
    private static AeadKind Kind(string name) => Enum.Parse<AeadKind>(name);

    private static byte[] RandomBytes(Random rng, int n)
    {
        var b = new byte[n];
        rng.NextBytes(b);
        return b;
    }
}

public class AeadBackendTests
{
    // A host check: the CPU of this machine has AES-NI and carry-less multiply, so AES-256-GCM
    // runs on AesGcmNi, and the tests below compare it with EVP (skip elsewhere: Category!=Host).
    [Fact]
    [Trait("Category", "Host")]
    public void AesGcmNi_IsSupportedOnThisMachine()
    {
        Assert.True(AesGcmNi.IsSupported, "no AES-NI/PCLMULQDQ here: AES-GCM goes through EVP");
        Assert.StartsWith("aes-ni,", Aead.Backend);
    }

    // The managed AES-GCM against libcrypto's: every length 0..300 (the partial blocks, and the
    // four-block loop with every tail), then large records, each with an aad of 0..40 bytes, in
    // place and not; then a flipped bit anywhere is refused and leaves zeros.
    [Fact]
    public void AesGcmNi_MatchesEvp_OverLengthsAndAads_InPlaceOrNot()
    {
        if (!AesGcmNi.IsSupported) return;                   // nothing to compare on this CPU (the host check says so)
        var rng = new Random(38_0001);
        byte[] key = new byte[32];
        rng.NextBytes(key);
        using var ni = new AesGcmNi(key);
        using var evp = new Aead(AeadKind.Aes256Gcm, key, AeadImpl.Evp);
        int[] lengths = [.. Enumerable.Range(0, 301), 511, 512, 513, 1420, 1439, 4095, 9000, 65000];
        foreach (int len in lengths)
        {
            byte[] nonce = new byte[12], aad = new byte[len % 41], pt = new byte[len];
            rng.NextBytes(nonce);
            rng.NextBytes(aad);
            rng.NextBytes(pt);
            byte[] want = new byte[len + 16], got = new byte[len + 16];
            evp.Seal(nonce, pt, aad, want);
            ni.Seal(nonce, pt, aad, got);
            Assert.True(want.AsSpan().SequenceEqual(got), $"seal differs at length {len}");
            byte[] buf = new byte[len + 16];
            pt.CopyTo(buf, 0);
            ni.Seal(nonce, buf.AsSpan(0, len), aad, buf);
            Assert.True(want.AsSpan().SequenceEqual(buf), $"in-place seal differs at length {len}");
            Assert.True(ni.Open(nonce, buf, aad, buf.AsSpan(0, len)), $"open refused length {len}");
            Assert.True(pt.AsSpan().SequenceEqual(buf.AsSpan(0, len)), $"open differs at length {len}");
            if (len > 2000) continue;
            int bit = rng.Next((len + 16) * 8);
            want[bit / 8] ^= (byte)(1 << (bit % 8));
            byte[] back = new byte[len];
            Array.Fill(back, (byte)0xAA);
            Assert.False(ni.Open(nonce, want, aad, back), $"a flipped bit {bit} at length {len} was accepted");
            Assert.All(back, x => Assert.Equal(0, x));
        }
    }

    // A host check: this machine has what the fast path needs (skip elsewhere: Category!=Host).
    [Fact]
    [Trait("Category", "Host")]
    public void Evp_IsLoadedOnThisMachine() => Assert.True(Evp.Loaded, "libcrypto could not be loaded: the fast AEAD path is off");

    [Theory]
    [InlineData(1, 0)]
    [InlineData(1, 1420)]
    [InlineData(2, 1)]
    [InlineData(2, 9000)]
    public void EvpAndBaseLibrary_AreInterchangeable(int kind, int len)
    {
        byte[] key = new byte[32];
        new Random(len).NextBytes(key);
        using var evp = new Aead((AeadKind)kind, key);
        using var bcl = new Aead((AeadKind)kind, key, AeadImpl.BaseLibrary);
        byte[] nonce = new byte[12], aad = new byte[19], pt = new byte[len];
        new Random(len + 1).NextBytes(pt);
        byte[] a = new byte[len + 16], b = new byte[len + 16], back = new byte[len];
        evp.Seal(nonce, pt, aad, a);
        bcl.Seal(nonce, pt, aad, b);
        Assert.Equal(a, b);
        Assert.True(bcl.Open(nonce, a, aad, back));
        Assert.Equal(pt, back);
        a[^1] ^= 1;
        Assert.False(evp.Open(nonce, a, aad, back));
        Assert.False(bcl.Open(nonce, a, aad, back));
        Assert.All(back, x => Assert.Equal(0, x));          // no unauthenticated plaintext left behind
    }
}
