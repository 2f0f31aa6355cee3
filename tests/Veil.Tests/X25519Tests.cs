using System.Text.Json;

namespace Veil.Tests;

// §6 X25519: RFC 7748 §5.2/§6.1 known answers (rfc_vectors.json) and every Wycheproof
// x25519_test.json case. Harness rule (tests/vectors/README.md): raw ScalarMult returns
// `shared` for all 518 cases; Dh rejects exactly the 31 ZeroSharedSecret cases.
public sealed class X25519Tests
{
    private const int WycheproofCaseCount = 518;
    private const int ZeroSharedSecretCount = 31;

    private static readonly byte[] BasePoint = Vectors.Hex("0900000000000000000000000000000000000000000000000000000000000000");

    // ---- RFC 7748 ----

    public static TheoryData<string, string, string, string> Rfc7748ScalarMultVectors()
    {
        var data = new TheoryData<string, string, string, string>();
        using JsonDocument doc = Vectors.Load("rfc_vectors.json");
        foreach (JsonElement v in doc.RootElement.GetProperty("x25519").GetProperty("scalar_multiplication").EnumerateArray())
            data.Add(Vectors.Str(v, "section"), Vectors.Str(v, "scalar"), Vectors.Str(v, "u_coordinate"), Vectors.Str(v, "output"));
        return data;
    }

    [Theory]
    [MemberData(nameof(Rfc7748ScalarMultVectors))]
    public void ScalarMult_Rfc7748Section52Vector_MatchesOutput(string section, string scalar, string u, string output)
    {
        var shared = new byte[32];
        X25519.ScalarMult(shared, Vectors.Hex(scalar), Vectors.Hex(u));
        Assert.Equal(output, Convert.ToHexStringLower(shared));
    }

    [Fact]
    public void Rfc7748Vectors_Loaded_TwoScalarMultAndThreeIterated()
    {
        Assert.Equal(2, Rfc7748ScalarMultVectors().Count());
        using JsonDocument doc = Vectors.Load("rfc_vectors.json");
        Assert.Equal(3, doc.RootElement.GetProperty("x25519").GetProperty("iterated").GetProperty("results").GetArrayLength());
    }

    [Theory]
    [InlineData(1)]
    [InlineData(1000)]
    public void ScalarMult_Rfc7748Iterated_MatchesK(int iterations) =>
        Assert.Equal(IteratedExpected(iterations), Convert.ToHexStringLower(Iterate(iterations)));

    [Fact]
    [Trait("Category", "Slow")]
    public void ScalarMult_Rfc7748IteratedMillion_MatchesK() =>
        Assert.Equal(IteratedExpected(1_000_000), Convert.ToHexStringLower(Iterate(1_000_000)));

    [Fact]
    public void PublicKey_Rfc7748Section61AliceAndBob_MatchPublished()
    {
        JsonElement dh = DhVector(out JsonDocument doc);
        using (doc)
        {
            var pub = new byte[32];
            X25519.PublicKey(pub, Vectors.Hex(dh, "alice_private"));
            Assert.Equal(Vectors.Str(dh, "alice_public"), Convert.ToHexStringLower(pub));
            X25519.PublicKey(pub, Vectors.Hex(dh, "bob_private"));
            Assert.Equal(Vectors.Str(dh, "bob_public"), Convert.ToHexStringLower(pub));
        }
    }

    [Fact]
    public void Dh_Rfc7748Section61BothDirections_GiveSharedSecret()
    {
        JsonElement dh = DhVector(out JsonDocument doc);
        using (doc)
        {
            string expected = Vectors.Str(dh, "shared_secret");
            var k = new byte[32];
            Assert.True(X25519.Dh(k, Vectors.Hex(dh, "alice_private"), Vectors.Hex(dh, "bob_public")));
            Assert.Equal(expected, Convert.ToHexStringLower(k));
            k.AsSpan().Clear();
            Assert.True(X25519.Dh(k, Vectors.Hex(dh, "bob_private"), Vectors.Hex(dh, "alice_public")));
            Assert.Equal(expected, Convert.ToHexStringLower(k));
            X25519.ScalarMult(k, Vectors.Hex(dh, "alice_private"), Vectors.Hex(dh, "bob_public"));
            Assert.Equal(expected, Convert.ToHexStringLower(k));
        }
    }

    // ---- Properties on random inputs (fixed seed) ----

    [Fact]
    public void PublicKey_RandomPrivate_EqualsScalarMultOfBasePoint()
    {
        var rng = new Random(7748);
        var priv = new byte[32];
        var a = new byte[32];
        var b = new byte[32];
        for (int i = 0; i < 16; i++)
        {
            rng.NextBytes(priv);
            X25519.PublicKey(a, priv);
            X25519.ScalarMult(b, priv, BasePoint);
            Assert.True(a.AsSpan().SequenceEqual(b), $"seed 7748 iteration {i} priv {Convert.ToHexStringLower(priv)}");
        }
    }

    [Fact]
    public void Dh_RandomKeyPairs_BothSidesAgree()
    {
        var rng = new Random(6101);
        var privA = new byte[32];
        var privB = new byte[32];
        var pubA = new byte[32];
        var pubB = new byte[32];
        var kA = new byte[32];
        var kB = new byte[32];
        for (int i = 0; i < 16; i++)
        {
            rng.NextBytes(privA);
            rng.NextBytes(privB);
            X25519.PublicKey(pubA, privA);
            X25519.PublicKey(pubB, privB);
            Assert.True(X25519.Dh(kA, privA, pubB));
            Assert.True(X25519.Dh(kB, privB, pubA));
            Assert.True(kA.AsSpan().SequenceEqual(kB), $"seed 6101 iteration {i}");
            Assert.True(kA.AsSpan().IndexOfAnyExcept((byte)0) >= 0, "all-zero DH result");
        }
    }

    [Fact]
    public void ScalarMult_UnclampedScalar_SameAsClamped()
    {
        var rng = new Random(5);
        var scalar = new byte[32];
        var u = new byte[32];
        var raw = new byte[32];
        var clamped = new byte[32];
        for (int i = 0; i < 16; i++)
        {
            rng.NextBytes(scalar);
            rng.NextBytes(u);
            scalar[0] |= 7;      // bits that clamping clears
            scalar[31] |= 0x80;  // bit 255, cleared by clamping
            scalar[31] &= 0xbf;  // bit 254, set by clamping
            X25519.ScalarMult(raw, scalar, u);
            scalar[0] &= 248;
            scalar[31] &= 127;
            scalar[31] |= 64;
            X25519.ScalarMult(clamped, scalar, u);
            Assert.True(raw.AsSpan().SequenceEqual(clamped), $"seed 5 iteration {i}");
        }
    }

    [Fact]
    public void ScalarMult_UWithBit255Set_SameAsMasked()
    {
        var rng = new Random(255);
        var scalar = new byte[32];
        var u = new byte[32];
        var high = new byte[32];
        var masked = new byte[32];
        for (int i = 0; i < 16; i++)
        {
            rng.NextBytes(scalar);
            rng.NextBytes(u);
            u[31] |= 0x80;
            X25519.ScalarMult(high, scalar, u);
            u[31] &= 0x7f;
            X25519.ScalarMult(masked, scalar, u);
            Assert.True(high.AsSpan().SequenceEqual(masked), $"seed 255 iteration {i}");
        }
    }

    [Fact]
    public void ScalarMult_DirtyOutputBuffer_ResultUnaffected()
    {
        JsonElement dh = DhVector(out JsonDocument doc);
        using (doc)
        {
            var k = new byte[32];
            k.AsSpan().Fill(0xa5);
            X25519.ScalarMult(k, Vectors.Hex(dh, "alice_private"), Vectors.Hex(dh, "bob_public"));
            Assert.Equal(Vectors.Str(dh, "shared_secret"), Convert.ToHexStringLower(k));
        }
    }

    // ---- Wycheproof x25519_test.json ----

    private sealed record WycheproofCase(int TcId, string Result, string Flags, string Private, string Public, string Shared);

    private static readonly Lazy<List<WycheproofCase>> s_wycheproof = new(LoadWycheproof);

    private static List<WycheproofCase> LoadWycheproof()
    {
        var cases = new List<WycheproofCase>();
        using JsonDocument doc = Vectors.Load("x25519_test.json");
        foreach (JsonElement g in doc.RootElement.GetProperty("testGroups").EnumerateArray())
            foreach (JsonElement t in g.GetProperty("tests").EnumerateArray())
                cases.Add(new WycheproofCase(t.GetProperty("tcId").GetInt32(), Vectors.Str(t, "result"), Vectors.Flags(t),
                    Vectors.Str(t, "private"), Vectors.Str(t, "public"), Vectors.Str(t, "shared")));
        return cases;
    }

    public static TheoryData<int, string, string, string, string, string> WycheproofCases()
    {
        var data = new TheoryData<int, string, string, string, string, string>();
        foreach (WycheproofCase c in s_wycheproof.Value) data.Add(c.TcId, c.Result, c.Flags, c.Private, c.Public, c.Shared);
        return data;
    }

    [Fact]
    public void WycheproofX25519_Loaded_518CasesWith31ZeroShared()
    {
        List<WycheproofCase> cases = s_wycheproof.Value;
        Assert.Equal(WycheproofCaseCount, cases.Count);
        Assert.Equal(264, cases.Count(c => c.Result == "valid"));
        Assert.Equal(254, cases.Count(c => c.Result == "acceptable"));
        var zeroShared = cases.Where(c => c.Shared == new string('0', 64)).Select(c => c.TcId).ToList();
        var zeroFlag = cases.Where(c => c.Flags.Split(',').Contains("ZeroSharedSecret")).Select(c => c.TcId).ToList();
        Assert.Equal(ZeroSharedSecretCount, zeroShared.Count);
        Assert.Equal(zeroFlag, zeroShared);
    }

    [Theory]
    [MemberData(nameof(WycheproofCases))]
    public void ScalarMult_WycheproofCase_ReturnsExactlyShared(int tcId, string result, string flags, string priv, string pub, string shared)
    {
        var k = new byte[32];
        X25519.ScalarMult(k, Vectors.Hex(priv), Vectors.Hex(pub));
        Assert.Equal(shared, Convert.ToHexStringLower(k));
    }

    [Theory]
    [MemberData(nameof(WycheproofCases))]
    public void Dh_WycheproofCase_RejectsOnlyZeroSharedSecret(int tcId, string result, string flags, string priv, string pub, string shared)
    {
        bool zero = shared == new string('0', 64);
        var k = new byte[32];
        bool ok = X25519.Dh(k, Vectors.Hex(priv), Vectors.Hex(pub));
        Assert.Equal(!zero, ok);
        if (ok) Assert.Equal(shared, Convert.ToHexStringLower(k));
    }

    [Fact]
    public void Dh_AllWycheproofCases_RejectedSetIsExactlyZeroSharedSecretFlag()
    {
        var rejected = new List<int>();
        var wrong = new List<int>();
        var k = new byte[32];
        foreach (WycheproofCase c in s_wycheproof.Value)
        {
            if (!X25519.Dh(k, Vectors.Hex(c.Private), Vectors.Hex(c.Public))) rejected.Add(c.TcId);
            else if (Convert.ToHexStringLower(k) != c.Shared) wrong.Add(c.TcId);
        }
        var expected = s_wycheproof.Value.Where(c => c.Flags.Split(',').Contains("ZeroSharedSecret")).Select(c => c.TcId).ToList();
        Assert.True(wrong.Count == 0, "Dh returned a wrong secret for tcId " + string.Join(",", wrong));
        Assert.Equal(expected, rejected);
    }

    // ---- helpers ----

    private static byte[] Iterate(int iterations)
    {
        byte[] k = (byte[])BasePoint.Clone();
        byte[] u = (byte[])BasePoint.Clone();
        var r = new byte[32];
        for (int i = 0; i < iterations; i++)
        {
            X25519.ScalarMult(r, k, u);
            (u, k, r) = (k, r, u);  // u <- old k, k <- result, reuse old u as next output
        }
        return k;
    }

    private static string IteratedExpected(int iterations)
    {
        using JsonDocument doc = Vectors.Load("rfc_vectors.json");
        foreach (JsonElement r in doc.RootElement.GetProperty("x25519").GetProperty("iterated").GetProperty("results").EnumerateArray())
            if (r.GetProperty("iterations").GetInt32() == iterations) return Vectors.Str(r, "k");
        throw new InvalidDataException($"rfc_vectors.json has no iterated result for {iterations}");
    }

    private static JsonElement DhVector(out JsonDocument doc)
    {
        doc = Vectors.Load("rfc_vectors.json");
        return doc.RootElement.GetProperty("x25519").GetProperty("diffie_hellman");
    }
}
