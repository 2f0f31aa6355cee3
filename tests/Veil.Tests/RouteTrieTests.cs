using System.Net;
using Xunit.Abstractions;

namespace Veil.Tests;

// §2 IpPrefix and §8 RouteTrie: named cases, then random operations against a deliberately
// naive model (a list of (prefix, peer); the longest matching prefix wins), as the kernel's
// selftest/allowedips.c does with horrible_allowedips and wireguard-go with SlowRouter.
public sealed class RouteTrieTests
{
    private readonly ITestOutputHelper _out;

    public RouteTrieTests(ITestOutputHelper output) => _out = output;

    // ---- IpPrefix ----

    [Theory]
    [InlineData("10.1.2.3/8", "10.0.0.0/8", 8, false)]
    [InlineData("10.0.0.0/8", "10.0.0.0/8", 8, false)]
    [InlineData("192.0.2.77/24", "192.0.2.0/24", 24, false)]
    [InlineData("192.0.2.77/32", "192.0.2.77/32", 32, false)]
    [InlineData("100.127.255.255/10", "100.64.0.0/10", 10, false)]
    [InlineData("0.0.0.0/0", "0.0.0.0/0", 0, false)]
    [InlineData("255.255.255.255/0", "0.0.0.0/0", 0, false)]
    [InlineData("203.0.113.255/31", "203.0.113.254/31", 31, false)]
    [InlineData("fd00::1/8", "fd00::/8", 8, true)]
    [InlineData("fd12:3456:789a::1/48", "fd12:3456:789a::/48", 48, true)]
    [InlineData("2001:db8:ffff::/33", "2001:db8:8000::/33", 33, true)]
    [InlineData("2001:db8::1/128", "2001:db8::1/128", 128, true)]
    [InlineData("2001:DB8:0:0:0:0:0:1/128", "2001:db8::1/128", 128, true)]
    [InlineData("FD00::/8", "fd00::/8", 8, true)]
    [InlineData("::/0", "::/0", 0, true)]
    [InlineData("ffff::1/0", "::/0", 0, true)]
    public void IpPrefix_Parse_MasksHostBitsToCanonicalForm(string text, string canonical, int bits, bool isV6)
    {
        Assert.True(IpPrefix.TryParse(text, out IpPrefix p));
        Assert.Equal(canonical, p.ToString());
        Assert.Equal(bits, p.Bits);
        Assert.Equal(isV6, p.IsV6);
        IpPrefix q = IpPrefix.Parse(text);
        Assert.Equal(canonical, q.ToString());
        Assert.Equal(canonical, IpPrefix.Parse(canonical).ToString());
    }

    [Theory]
    [InlineData("")]
    [InlineData("10.0.0.0/33")]
    [InlineData("10.0.0.0/64")]
    [InlineData("::/129")]
    [InlineData("fd00::/1000")]
    [InlineData("10.0.0.0/-1")]
    [InlineData("10.0.0.0/")]
    [InlineData("/8")]
    [InlineData("abc/8")]
    [InlineData("10.0.0.256/8")]
    [InlineData("1.2.3.4.5/8")]
    [InlineData("10.0.0.0/8/8")]
    [InlineData("10.0.0.0/8x")]
    [InlineData("gggg::/16")]
    [InlineData(":::/8")]
    [InlineData("10.0.0.0/99999999999")]
    public void IpPrefix_TryParseBadText_ReturnsFalse(string text)
    {
        Assert.False(IpPrefix.TryParse(text, out _), text);
        Assert.ThrowsAny<Exception>(() => IpPrefix.Parse(text));
    }

    // ---- RouteTrie: named cases ----

    [Fact]
    public void RouteTrie_Empty_LookupReturnsMinusOne()
    {
        var t = new RouteTrie();
        Assert.Equal(0, t.Count);
        Assert.Equal(-1, t.Lookup(A("10.0.0.1")));
        Assert.Equal(-1, t.Lookup(A("fd00::1")));
    }

    [Fact]
    public void RouteTrie_OverlappingPrefixes_LongestWins()
    {
        var t = new RouteTrie();
        t.Insert(P("10.0.0.0/8"), 1);
        t.Insert(P("10.1.0.0/16"), 2);
        t.Insert(P("10.1.2.0/24"), 3);
        t.Insert(P("10.1.2.3/32"), 4);
        t.Insert(P("10.1.2.128/25"), 5);
        Assert.Equal(5, t.Count);
        Assert.Equal(4, t.Lookup(A("10.1.2.3")));
        Assert.Equal(3, t.Lookup(A("10.1.2.4")));
        Assert.Equal(3, t.Lookup(A("10.1.2.127")));
        Assert.Equal(5, t.Lookup(A("10.1.2.128")));
        Assert.Equal(5, t.Lookup(A("10.1.2.255")));
        Assert.Equal(2, t.Lookup(A("10.1.3.0")));
        Assert.Equal(2, t.Lookup(A("10.1.255.255")));
        Assert.Equal(1, t.Lookup(A("10.2.0.0")));
        Assert.Equal(1, t.Lookup(A("10.255.255.255")));
        Assert.Equal(-1, t.Lookup(A("11.0.0.0")));
        Assert.Equal(-1, t.Lookup(A("9.255.255.255")));
    }

    [Fact]
    public void RouteTrie_InsertOrderReversed_LongestStillWins()
    {
        var t = new RouteTrie();
        t.Insert(P("2001:db8:1:2::/64"), 3);
        t.Insert(P("2001:db8:1::/48"), 2);
        t.Insert(P("2001:db8::/32"), 1);
        Assert.Equal(3, t.Lookup(A("2001:db8:1:2::1")));
        Assert.Equal(2, t.Lookup(A("2001:db8:1:3::1")));
        Assert.Equal(1, t.Lookup(A("2001:db8:2::1")));
        Assert.Equal(-1, t.Lookup(A("2001:db9::1")));
    }

    [Fact]
    public void RouteTrie_V4DefaultRoute_MatchesEveryV4AddressOnly()
    {
        var t = new RouteTrie();
        t.Insert(P("0.0.0.0/0"), 7);
        Assert.Equal(7, t.Lookup(A("0.0.0.0")));
        Assert.Equal(7, t.Lookup(A("203.0.113.9")));
        Assert.Equal(7, t.Lookup(A("255.255.255.255")));
        Assert.Equal(-1, t.Lookup(A("::")));
        Assert.Equal(-1, t.Lookup(A("fd00::1")));
        Assert.Equal(-1, t.Lookup(A("::ffff:10.1.2.3")));
    }

    [Fact]
    public void RouteTrie_V6DefaultRoute_MatchesEveryV6AddressOnly()
    {
        var t = new RouteTrie();
        t.Insert(P("::/0"), 6);
        Assert.Equal(6, t.Lookup(A("::")));
        Assert.Equal(6, t.Lookup(A("2001:db8::1")));
        Assert.Equal(6, t.Lookup(A("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        Assert.Equal(-1, t.Lookup(A("0.0.0.0")));
        Assert.Equal(-1, t.Lookup(A("10.0.0.1")));
    }

    [Fact]
    public void RouteTrie_V4AndV6SameLeadingBytes_StaySeparate()
    {
        // 10.0.0.0/8 and 0a00::/8 share their first byte.
        var t = new RouteTrie();
        t.Insert(P("10.0.0.0/8"), 1);
        t.Insert(P("a00::/8"), 2);
        Assert.Equal(2, t.Count);
        Assert.Equal(1, t.Lookup(A("10.9.8.7")));
        Assert.Equal(2, t.Lookup(A("a09:807::")));
        Assert.True(t.Remove(P("10.0.0.0/8")));
        Assert.Equal(-1, t.Lookup(A("10.9.8.7")));
        Assert.Equal(2, t.Lookup(A("a09:807::")));
    }

    [Fact]
    public void RouteTrie_HostRoutes_MatchOnlyThatAddress()
    {
        var t = new RouteTrie();
        t.Insert(P("192.0.2.1/32"), 1);
        t.Insert(P("2001:db8::1/128"), 2);
        Assert.Equal(1, t.Lookup(A("192.0.2.1")));
        Assert.Equal(-1, t.Lookup(A("192.0.2.0")));
        Assert.Equal(-1, t.Lookup(A("192.0.2.3")));
        Assert.Equal(-1, t.Lookup(A("193.0.2.1")));
        Assert.Equal(2, t.Lookup(A("2001:db8::1")));
        Assert.Equal(-1, t.Lookup(A("2001:db8::")));
        Assert.Equal(-1, t.Lookup(A("2001:db8::3")));
        Assert.Equal(-1, t.Lookup(A("2001:db8::1:0:0:1")));
    }

    [Fact]
    public void RouteTrie_OddBitLengths_MatchExactlyThoseBits()
    {
        var t = new RouteTrie();
        t.Insert(P("10.0.0.0/7"), 1);        // 10.x and 11.x
        t.Insert(P("128.0.0.0/1"), 2);
        t.Insert(P("fd00::/7"), 3);          // fc00::/7 after masking
        t.Insert(P("2001:db8:0:0:8000::/65"), 4);
        Assert.Equal(1, t.Lookup(A("10.200.0.1")));
        Assert.Equal(1, t.Lookup(A("11.0.0.1")));
        Assert.Equal(-1, t.Lookup(A("12.0.0.1")));
        Assert.Equal(-1, t.Lookup(A("127.255.255.255")));
        Assert.Equal(2, t.Lookup(A("128.0.0.0")));
        Assert.Equal(2, t.Lookup(A("255.0.0.1")));
        Assert.Equal(3, t.Lookup(A("fc00::1")));
        Assert.Equal(3, t.Lookup(A("fdff::1")));
        Assert.Equal(-1, t.Lookup(A("fe00::1")));
        Assert.Equal(4, t.Lookup(A("2001:db8:0:0:8000:0:0:1")));
        Assert.Equal(4, t.Lookup(A("2001:db8:0:0:ffff:ffff:ffff:ffff")));
        Assert.Equal(-1, t.Lookup(A("2001:db8:0:0:7fff:ffff:ffff:ffff")));
        Assert.Equal(-1, t.Lookup(A("2001:db8:0:1:8000::")));
    }

    [Fact]
    public void RouteTrie_InsertEqualPrefix_ReplacesValue()
    {
        var t = new RouteTrie();
        t.Insert(P("10.1.2.3/8"), 1);
        t.Insert(P("10.0.0.0/8"), 2);   // equal after masking
        Assert.Equal(1, t.Count);
        Assert.Equal(2, t.Lookup(A("10.5.5.5")));
        t.Insert(P("fd00::/8"), 3);
        t.Insert(P("fd00::1/8"), 4);
        Assert.Equal(2, t.Count);
        Assert.Equal(4, t.Lookup(A("fd99::1")));
    }

    [Fact]
    public void RouteTrie_RemoveLonger_RestoresShorterMatch()
    {
        var t = new RouteTrie();
        t.Insert(P("10.0.0.0/8"), 1);
        t.Insert(P("10.1.0.0/16"), 2);
        t.Insert(P("fd00::/8"), 3);
        t.Insert(P("fd00:1::/32"), 4);
        Assert.Equal(2, t.Lookup(A("10.1.0.1")));
        Assert.Equal(4, t.Lookup(A("fd00:1::1")));
        Assert.True(t.Remove(P("10.1.0.0/16")));
        Assert.True(t.Remove(P("fd00:1::/32")));
        Assert.Equal(2, t.Count);
        Assert.Equal(1, t.Lookup(A("10.1.0.1")));
        Assert.Equal(3, t.Lookup(A("fd00:1::1")));
    }

    [Fact]
    public void RouteTrie_RemoveShorter_KeepsLonger()
    {
        var t = new RouteTrie();
        t.Insert(P("10.0.0.0/8"), 1);
        t.Insert(P("10.1.0.0/16"), 2);
        Assert.True(t.Remove(P("10.0.0.0/8")));
        Assert.Equal(2, t.Lookup(A("10.1.0.1")));
        Assert.Equal(-1, t.Lookup(A("10.2.0.1")));
        Assert.Equal(1, t.Count);
    }

    [Fact]
    public void RouteTrie_RemoveAbsentPrefix_ReturnsFalseAndChangesNothing()
    {
        var t = new RouteTrie();
        Assert.False(t.Remove(P("10.0.0.0/8")));
        t.Insert(P("10.0.0.0/8"), 1);
        Assert.False(t.Remove(P("10.0.0.0/9")));    // same address, other length
        Assert.False(t.Remove(P("10.0.0.0/7")));
        Assert.False(t.Remove(P("0.0.0.0/0")));
        Assert.False(t.Remove(P("a00::/8")));       // same bytes, other family
        Assert.Equal(1, t.Count);
        Assert.Equal(1, t.Lookup(A("10.0.0.1")));
        Assert.True(t.Remove(P("10.9.9.9/8")));     // host bits are masked off
        Assert.False(t.Remove(P("10.0.0.0/8")));
        Assert.Equal(0, t.Count);
        Assert.Equal(-1, t.Lookup(A("10.0.0.1")));
    }

    [Fact]
    public void RouteTrie_RemoveByPeer_RemovesOnlyThatPeersPrefixesInBothFamilies()
    {
        var t = new RouteTrie();
        t.Insert(P("10.0.0.0/8"), 1);
        t.Insert(P("10.1.0.0/16"), 2);
        t.Insert(P("10.1.2.0/24"), 1);
        t.Insert(P("fd00::/8"), 1);
        t.Insert(P("fd00:1::/32"), 2);
        t.Insert(P("0.0.0.0/0"), 3);
        Assert.Equal(3, t.RemoveByPeer(1));
        Assert.Equal(3, t.Count);
        Assert.Equal(2, t.Lookup(A("10.1.2.3")));
        Assert.Equal(3, t.Lookup(A("10.2.0.1")));
        Assert.Equal(-1, t.Lookup(A("fd99::1")));
        Assert.Equal(2, t.Lookup(A("fd00:1::1")));
        Assert.Equal(0, t.RemoveByPeer(1));
        Assert.Equal(0, t.RemoveByPeer(42));
        Assert.Equal(2, t.RemoveByPeer(2));
        Assert.Equal(3, t.Lookup(A("10.1.2.3")));
        Assert.Equal(1, t.Count);
    }

    [Fact]
    public void RouteTrie_RemoveAllThenReinsert_Works()
    {
        var t = new RouteTrie();
        string[] prefixes = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "0.0.0.0/0", "fd00::/8", "::/0", "2001:db8::1/128"];
        for (int i = 0; i < prefixes.Length; i++) t.Insert(P(prefixes[i]), i);
        Assert.Equal(prefixes.Length, t.Count);
        foreach (string s in prefixes) Assert.True(t.Remove(P(s)), s);
        Assert.Equal(0, t.Count);
        Assert.Equal(-1, t.Lookup(A("10.1.2.3")));
        Assert.Equal(-1, t.Lookup(A("2001:db8::1")));
        t.Insert(P("10.1.2.0/24"), 9);
        Assert.Equal(9, t.Lookup(A("10.1.2.3")));
    }

    // ---- RouteTrie: random operations against a naive model ----

    private sealed record Route(bool IsV6, byte[] Masked, int Bits, int Peer);

    [Fact]
    public void RouteTrie_RandomOperations_MatchNaiveModel()
    {
        const int seed = 20191209;
        const int operations = 30_000;
        _out.WriteLine($"seed {seed}, {operations} operations");
        var rng = new Random(seed);
        var trie = new RouteTrie();
        var model = new List<Route>();
        int lookups = 0, hits = 0, inserts = 0, removes = 0, removedByPeer = 0;

        for (int op = 0; op < operations; op++)
        {
            int kind = rng.Next(100);
            bool v6 = rng.Next(2) == 1;
            string where = $"seed {seed} op {op}";
            if (kind < 35)
            {
                (byte[] addr, int bits) = RandomPrefix(rng, v6);
                int peer = rng.Next(16);
                byte[] masked = Mask(addr, bits);
                string text = $"{new IPAddress(addr)}/{bits}";
                IpPrefix p = IpPrefix.Parse(text);
                string canonical = $"{new IPAddress(masked)}/{bits}";
                if (p.ToString() != canonical) Assert.Fail($"{where}: Parse(\"{text}\").ToString() = {p}, expected {canonical}");
                trie.Insert(p, peer);
                int i = model.FindIndex(r => r.IsV6 == v6 && r.Bits == bits && r.Masked.AsSpan().SequenceEqual(masked));
                if (i >= 0) model[i] = model[i] with { Peer = peer };
                else model.Add(new Route(v6, masked, bits, peer));
                inserts++;
            }
            else if (kind < 50)
            {
                byte[] addr;
                int bits;
                if (model.Count > 0 && rng.Next(3) != 0)
                {
                    Route r = model[rng.Next(model.Count)];
                    (addr, bits) = (r.Masked, r.Bits);
                    v6 = r.IsV6;
                }
                else (addr, bits) = RandomPrefix(rng, v6);
                byte[] masked = Mask(addr, bits);
                int i = model.FindIndex(r => r.IsV6 == v6 && r.Bits == bits && r.Masked.AsSpan().SequenceEqual(masked));
                bool got = trie.Remove(IpPrefix.Parse($"{new IPAddress(addr)}/{bits}"));
                if (got != (i >= 0)) Assert.Fail($"{where}: Remove({new IPAddress(masked)}/{bits}) = {got}, expected {i >= 0}");
                if (i >= 0) model.RemoveAt(i);
                removes++;
            }
            else if (kind < 52)
            {
                int peer = rng.Next(17);
                int expected = model.RemoveAll(r => r.Peer == peer);
                int got = trie.RemoveByPeer(peer);
                if (got != expected) Assert.Fail($"{where}: RemoveByPeer({peer}) = {got}, expected {expected}");
                removedByPeer += got;
            }
            else
            {
                byte[] addr = rng.Next(10) == 0 ? RandomBytes(rng, v6 ? 16 : 4) : RandomPrefix(rng, v6).Address;
                int expected = NaiveLookup(model, addr);
                int got = trie.Lookup(addr);
                if (got != expected) Assert.Fail($"{where}: Lookup({new IPAddress(addr)}) = {got}, expected {expected}; model has {model.Count} routes");
                lookups++;
                if (expected >= 0) hits++;
            }
            if (trie.Count != model.Count) Assert.Fail($"{where}: Count = {trie.Count}, expected {model.Count}");
        }
        _out.WriteLine($"inserts {inserts}, removes {removes}, removed by peer {removedByPeer}, lookups {lookups} ({hits} hits), final routes {model.Count}");
        Assert.True(hits > lookups / 4 && hits < lookups, $"seed {seed}: poor mix, {hits} hits of {lookups} lookups");
    }

    // Longest matching prefix of the same family; equal prefixes never coexist in the model.
    private static int NaiveLookup(List<Route> model, byte[] addr)
    {
        bool v6 = addr.Length == 16;
        int bestBits = -1, bestPeer = -1;
        foreach (Route r in model)
        {
            if (r.IsV6 != v6 || r.Bits <= bestBits) continue;
            if (Mask(addr, r.Bits).AsSpan().SequenceEqual(r.Masked)) (bestBits, bestPeer) = (r.Bits, r.Peer);
        }
        return bestPeer;
    }

    // Clustered so prefixes overlap: a few bases, with random bits only below a cluster depth.
    private static readonly byte[][] V4Bases = [A("10.0.0.0"), A("10.1.0.0"), A("192.168.1.0"), A("100.64.0.0")];
    private static readonly byte[][] V6Bases = [A("fd00::"), A("fd00:1::"), A("2001:db8::"), A("2001:db8:1::")];
    private static readonly int[] V4Depths = [8, 16, 24, 28, 30];
    private static readonly int[] V6Depths = [16, 32, 48, 64, 96, 120];

    private static (byte[] Address, int Bits) RandomPrefix(Random rng, bool v6)
    {
        byte[][] bases = v6 ? V6Bases : V4Bases;
        int[] depths = v6 ? V6Depths : V4Depths;
        int total = v6 ? 128 : 32;
        byte[] addr = (byte[])bases[rng.Next(bases.Length)].Clone();
        int keep = depths[rng.Next(depths.Length)];
        for (int bit = keep; bit < total; bit++)
            if (rng.Next(2) == 1) addr[bit / 8] |= (byte)(0x80 >> (bit % 8));
        int bits = rng.Next(10) == 0 ? rng.Next(0, total + 1) : Math.Clamp(keep + rng.Next(-8, 9), 0, total);
        return (addr, bits);
    }

    private static byte[] Mask(byte[] addr, int bits)
    {
        var m = new byte[addr.Length];
        for (int bit = 0; bit < bits; bit++) m[bit / 8] |= (byte)(addr[bit / 8] & (0x80 >> (bit % 8)));
        return m;
    }

    private static byte[] RandomBytes(Random rng, int n)
    {
        var b = new byte[n];
        rng.NextBytes(b);
        return b;
    }

    private static IpPrefix P(string s) => IpPrefix.Parse(s);
    private static byte[] A(string s) => IPAddress.Parse(s).GetAddressBytes();
}
