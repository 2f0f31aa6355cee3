using System.Security.Cryptography;
using System.Text.Json;

namespace Veil.Tests;

// §6 Hkdf: RFC 5869 HKDF-SHA256 against every Wycheproof hkdf_sha256_test.json case and the BCL's
// HKDF; Noise's HKDF (rev 34 §4.3) against a direct HMAC-SHA256 computation.
public sealed class HkdfTests
{
    private const int MaxOutputLen = 255 * 32;

    // ---- Derive ----

    public static TheoryData<int, string, string, string, string, string, int, string> WycheproofCases()
    {
        var data = new TheoryData<int, string, string, string, string, string, int, string>();
        using JsonDocument doc = Vectors.Load("hkdf_sha256_test.json");
        foreach (JsonElement g in doc.RootElement.GetProperty("testGroups").EnumerateArray())
            foreach (JsonElement t in g.GetProperty("tests").EnumerateArray())
                data.Add(t.GetProperty("tcId").GetInt32(), Vectors.Str(t, "result"), Vectors.Flags(t), Vectors.Str(t, "ikm"),
                    Vectors.Str(t, "salt"), Vectors.Str(t, "info"), t.GetProperty("size").GetInt32(), Vectors.Str(t, "okm"));
        return data;
    }

    [Fact]
    public void WycheproofHkdf_Loaded_86CasesWith3Invalid()
    {
        TheoryData<int, string, string, string, string, string, int, string> cases = WycheproofCases();
        Assert.Equal(86, cases.Count());
        Assert.Equal(3, cases.Count(row => (string)row[1] == "invalid"));
        Assert.Equal(83, cases.Count(row => (string)row[1] == "valid"));
    }

    [Theory]
    [MemberData(nameof(WycheproofCases))]
    public void Derive_WycheproofCase_MatchesResult(int tcId, string result, string flags, string ikm, string salt, string info, int size, string okm)
    {
        var output = new byte[size];
        bool ok = Hkdf.Derive(output, Vectors.Hex(ikm), Vectors.Hex(salt), Vectors.Hex(info));
        if (result == "invalid")
        {
            Assert.False(ok, $"Derive accepted output length {size}");
            return;
        }
        Assert.Equal("valid", result);
        Assert.True(ok, $"Derive refused output length {size}");
        Assert.Equal(okm, Convert.ToHexStringLower(output));
    }

    [Theory]
    [InlineData(0, false)]
    [InlineData(1, true)]
    [InlineData(MaxOutputLen, true)]
    [InlineData(MaxOutputLen + 1, false)]
    public void Derive_OutputLength_AcceptedOnlyFrom1To8160(int length, bool expected)
    {
        var output = new byte[length];
        Assert.Equal(expected, Hkdf.Derive(output, new byte[32], new byte[32], default));
    }

    [Fact]
    public void Derive_RandomInputs_MatchesBclHkdf()
    {
        const int seed = 5869;
        var rng = new Random(seed);
        int[] lengths = [1, 31, 32, 33, 64, 65, 96, 255, 1000, MaxOutputLen];
        int[] inputLengths = [0, 1, 32, 33, 64, 65, 200];
        for (int i = 0; i < lengths.Length; i++)
        {
            byte[] ikm = RandomBytes(rng, inputLengths[rng.Next(inputLengths.Length)]);
            byte[] salt = RandomBytes(rng, inputLengths[rng.Next(inputLengths.Length)]);
            byte[] info = RandomBytes(rng, inputLengths[rng.Next(inputLengths.Length)]);
            var actual = new byte[lengths[i]];
            Assert.True(Hkdf.Derive(actual, ikm, salt, info));
            byte[] expected = HKDF.DeriveKey(HashAlgorithmName.SHA256, ikm, lengths[i], salt, info);
            Assert.True(expected.AsSpan().SequenceEqual(actual),
                $"seed {seed} case {i}: ikm {ikm.Length}B salt {salt.Length}B info {info.Length}B out {lengths[i]}B");
        }
    }

    // ---- Noise HKDF ----

    [Fact]
    public void Noise_RandomInputsThreeOutputs_MatchesDirectHmac()
    {
        const int seed = 34;
        var rng = new Random(seed);
        int[] ikmLengths = [0, 32, 1, 64, 100];
        for (int i = 0; i < 20; i++)
        {
            byte[] ck = RandomBytes(rng, 32);
            byte[] ikm = RandomBytes(rng, ikmLengths[i % ikmLengths.Length]);
            var (e1, e2, e3) = NoiseReference(ck, ikm);
            byte[] o1 = new byte[32], o2 = new byte[32], o3 = new byte[32];
            Hkdf.Noise(ck, ikm, o1, o2, o3);
            string where = $"seed {seed} case {i} ikm {ikm.Length}B";
            Assert.True(e1.AsSpan().SequenceEqual(o1), where + ": out1");
            Assert.True(e2.AsSpan().SequenceEqual(o2), where + ": out2");
            Assert.True(e3.AsSpan().SequenceEqual(o3), where + ": out3");
        }
    }

    [Fact]
    public void Noise_EmptyOut3_WritesTwoOutputsOnly()
    {
        const int seed = 43;
        var rng = new Random(seed);
        for (int i = 0; i < 10; i++)
        {
            byte[] ck = RandomBytes(rng, 32);
            byte[] ikm = RandomBytes(rng, i % 2 == 0 ? 0 : 32);
            var (e1, e2, _) = NoiseReference(ck, ikm);
            byte[] o1 = new byte[32], o2 = new byte[32];
            Hkdf.Noise(ck, ikm, o1, o2, Span<byte>.Empty);
            Assert.True(e1.AsSpan().SequenceEqual(o1), $"seed {seed} case {i}: out1");
            Assert.True(e2.AsSpan().SequenceEqual(o2), $"seed {seed} case {i}: out2");
        }
    }

    [Fact]
    public void Noise_Outputs_EqualRfc5869WithChainingKeyAsSaltAndEmptyInfo()
    {
        var rng = new Random(96);
        byte[] ck = RandomBytes(rng, 32), ikm = RandomBytes(rng, 32);
        byte[] o1 = new byte[32], o2 = new byte[32], o3 = new byte[32];
        Hkdf.Noise(ck, ikm, o1, o2, o3);
        var okm = new byte[96];
        Assert.True(Hkdf.Derive(okm, ikm, ck, default));
        Assert.Equal(Convert.ToHexStringLower(okm), Convert.ToHexStringLower(o1.Concat(o2).Concat(o3).ToArray()));
    }

    // temp = HMAC(ck, ikm); o1 = HMAC(temp, 0x01); o2 = HMAC(temp, o1 || 0x02); o3 = HMAC(temp, o2 || 0x03)
    private static (byte[], byte[], byte[]) NoiseReference(byte[] ck, byte[] ikm)
    {
        byte[] temp = HMACSHA256.HashData(ck, ikm);
        byte[] o1 = HMACSHA256.HashData(temp, new byte[] { 0x01 });
        byte[] o2 = HMACSHA256.HashData(temp, o1.Append((byte)0x02).ToArray());
        byte[] o3 = HMACSHA256.HashData(temp, o2.Append((byte)0x03).ToArray());
        return (o1, o2, o3);
    }

    private static byte[] RandomBytes(Random rng, int n)
    {
        var b = new byte[n];
        rng.NextBytes(b);
        return b;
    }
}
