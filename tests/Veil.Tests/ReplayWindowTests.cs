using Xunit.Abstractions;

namespace Veil.Tests;

// §11 ReplayWindow (RFC 6479 style). Semantics under test, as the lead defined them:
//   Accept(c) is true, and marks c, iff c < Spec.RejectAfterMessages, c was not accepted before,
//   and c >= highest - WindowSize + 1, where highest is the largest counter accepted so far
//   (a fresh window accepts any c below the limit). CanAccept(c) answers the same without
//   changing state. So exactly WindowSize counters, highest-(W-1) .. highest, are inside.
// NOTE: the kernel's counter_validate accepts one more (highest - W), so its selftest table uses
// T_LIM = W + 1; the table below is the same table with T_LIM = W.
public sealed class ReplayWindowTests
{
    private static readonly ulong W = (ulong)ReplayWindow.WindowSize;
    private static readonly ulong R = Spec.RejectAfterMessages;

    private readonly ITestOutputHelper _out;

    public ReplayWindowTests(ITestOutputHelper output) => _out = output;

    [Fact]
    public void WindowSize_AtLeast2048() => Assert.True(ReplayWindow.WindowSize >= 2048, $"WindowSize {ReplayWindow.WindowSize}");

    [Fact]
    public void RejectAfterMessages_LeavesRoomAboveWindow() =>
        Assert.True(R > W * 4 + 16, "the numbered table needs RejectAfterMessages well above 4 windows");

    // The kernel's selftest/counter.c table, numbered the same, with T_LIM = WindowSize.
    [Fact]
    public void Accept_KernelCounterTable_MatchesEachNumberedCase()
    {
        ulong t = W;
        (int Num, ulong Counter, bool Expected)[] table =
        [
            (1, 0, true),
            (2, 1, true),
            (3, 1, false),
            (4, 9, true),
            (5, 8, true),
            (6, 7, true),
            (7, 7, false),
            (8, t, true),                    // jump ahead
            (9, t - 1, true),
            (10, t - 1, false),
            (11, t - 2, true),
            (12, 2, true),                   // highest t: 2 is W-2 behind, inside
            (13, 2, false),
            (14, t + 16, true),
            (15, 3, false),                  // W+13 behind
            (16, t + 16, false),
            (17, t * 4, true),               // jump of more than the window
            (18, t * 4 - (t - 1), true),     // exactly W-1 behind highest: the edge, inside
            (19, 10, false),
            (20, t * 4 - t, false),          // W behind: one past the edge
            (21, t * 4 - (t + 1), false),
            (22, t * 4 - (t - 2), true),
            (23, t * 4 + 1 - t, false),      // same counter as case 18: replay
            (24, 0, false),
            (25, R, false),
            (26, R - 1, true),
            (27, R, false),
            (28, R - 1, false),
            (29, R - 2, true),
            (30, R + 1, false),
            (31, R + 2, false),
            (32, R - 2, false),
            (33, R - 3, true),
            (34, 0, false),
        ];
        var w = new ReplayWindow();
        foreach (var (num, counter, expected) in table)
        {
            bool can = w.CanAccept(counter);
            bool got = w.Accept(counter);
            Assert.True(got == expected, $"case {num}: Accept({counter}) = {got}, expected {expected} (WindowSize {W})");
            Assert.True(can == expected, $"case {num}: CanAccept({counter}) = {can}, expected {expected}");
        }
    }

    // Kernel bulk test 1, adapted: 1..W-1 then 0 (W-1 behind) is inside.
    [Fact]
    public void Accept_AscendingThenZeroAtEdge_ZeroAcceptedOnce()
    {
        var w = new ReplayWindow();
        for (ulong i = 1; i <= W - 1; i++) Assert.True(w.Accept(i), $"counter {i}");
        Assert.True(w.Accept(0), "0 is exactly W-1 behind highest W-1");
        Assert.False(w.Accept(0), "0 replayed");
    }

    // Kernel bulk test 1 as the kernel has it: 1..W then 0 is W behind: outside.
    [Fact]
    public void Accept_AscendingThenZeroOnePastEdge_ZeroRejected()
    {
        var w = new ReplayWindow();
        for (ulong i = 1; i <= W; i++) Assert.True(w.Accept(i), $"counter {i}");
        Assert.False(w.CanAccept(0), "CanAccept: 0 is W behind highest W");
        Assert.False(w.Accept(0), "0 is W behind highest W");
    }

    // Kernel bulk test 2, adapted.
    [Fact]
    public void Accept_AscendingFromTwoThenOneAndZero_OneInsideZeroOutside()
    {
        var w = new ReplayWindow();
        for (ulong i = 2; i <= W; i++) Assert.True(w.Accept(i), $"counter {i}");
        Assert.True(w.Accept(1), "1 is W-1 behind highest W");
        Assert.False(w.Accept(0), "0 is W behind highest W");
    }

    // Kernel bulk tests 3 and 4, adapted.
    [Fact]
    public void Accept_DescendingWholeWindow_AllAccepted()
    {
        var w = new ReplayWindow();
        for (ulong i = W; i-- > 0;) Assert.True(w.Accept(i), $"counter {i}");
        for (ulong i = 0; i < W; i++) Assert.False(w.Accept(i), $"replayed counter {i}");
    }

    [Fact]
    public void Accept_DescendingFromWToOne_ZeroRejected()
    {
        var w = new ReplayWindow();
        for (ulong i = W + 1; i-- > 1;) Assert.True(w.Accept(i), $"counter {i}");
        Assert.False(w.Accept(0));
    }

    // Kernel bulk tests 5 and 6, adapted.
    [Fact]
    public void Accept_DescendingThenNewHighest_ZeroFallsOut()
    {
        var w = new ReplayWindow();
        for (ulong i = W; i-- > 1;) Assert.True(w.Accept(i), $"counter {i}");
        Assert.True(w.Accept(W));
        Assert.False(w.Accept(0));
    }

    [Fact]
    public void Accept_DescendingToZeroThenNewHighest_Accepted()
    {
        var w = new ReplayWindow();
        for (ulong i = W; i-- > 1;) Assert.True(w.Accept(i), $"counter {i}");
        Assert.True(w.Accept(0));
        Assert.True(w.Accept(W));
        Assert.False(w.Accept(0));
        Assert.False(w.Accept(W));
    }

    // After a jump, every counter inside the new window that was never accepted must be
    // acceptable exactly once: stale bits from before the jump must be gone, whatever the
    // bitmap's block size or ring layout.
    [Theory]
    [InlineData(1UL)]
    [InlineData(63UL)]
    [InlineData(64UL)]
    [InlineData(65UL)]
    [InlineData(1000UL)]
    [InlineData(2047UL)]
    [InlineData(2048UL)]
    [InlineData(4096UL)]
    [InlineData(8192UL)]
    [InlineData(16384UL)]
    [InlineData(1UL << 20)]
    [InlineData((1UL << 40) + 3)]
    public void Accept_JumpAfterFullWindow_ClearsOldBits(ulong jump)
    {
        var w = new ReplayWindow();
        var model = new Model(W, R);
        for (ulong i = 0; i < W; i++) Assert.True(w.Accept(i) && model.Accept(i), $"fill {i}");
        ulong top = W - 1 + jump;
        Assert.True(w.Accept(top) && model.Accept(top), $"jump to {top}");
        ulong low = top >= W - 1 ? top - (W - 1) : 0;
        for (ulong c = low >= 70 ? low - 70 : 0; c <= top + 1; c++)
        {
            bool expected = model.CanAccept(c);
            Assert.True(w.CanAccept(c) == expected, $"jump {jump}: CanAccept({c}) expected {expected} (highest {top})");
            Assert.True(w.Accept(c) == model.Accept(c), $"jump {jump}: Accept({c}) expected {expected} (highest {top})");
        }
    }

    [Fact]
    public void CanAccept_Repeated_DoesNotChangeState()
    {
        var w = new ReplayWindow();
        for (int i = 0; i < 3; i++) Assert.True(w.CanAccept(5));
        Assert.True(w.Accept(5));
        Assert.False(w.CanAccept(5));
        Assert.False(w.Accept(5));
        // Probing far ahead must not move the window.
        Assert.True(w.CanAccept(W * 10));
        Assert.True(w.Accept(4), "4 still inside: CanAccept(W*10) must not have advanced the window");
        Assert.False(w.CanAccept(R));
    }

    [Fact]
    public void Reset_AfterUse_AcceptsZeroAgain()
    {
        var w = new ReplayWindow();
        Assert.True(w.Accept(0));
        Assert.True(w.Accept(W * 3));
        Assert.False(w.Accept(0));
        w.Reset();
        Assert.True(w.Accept(0));
        Assert.True(w.Accept(1));
        Assert.True(w.Accept(W * 3), "counter seen before Reset is new again");
    }

    [Fact]
    public void Accept_AtAndAboveRejectAfterMessages_Rejected()
    {
        var w = new ReplayWindow();
        Assert.False(w.CanAccept(R));
        Assert.False(w.Accept(R));
        Assert.False(w.Accept(ulong.MaxValue));
        Assert.True(w.Accept(R - 1));
        Assert.False(w.Accept(R));
        Assert.False(w.Accept(ulong.MaxValue));
        Assert.True(w.Accept(R - 1 - (W - 1)), "W-1 behind R-1: the edge, inside");
        Assert.False(w.Accept(R - 1 - W), "W behind R-1: one past the edge");
    }

    // Random operations against the reference model. Mostly near the top, some behind the edge,
    // some far jumps, many duplicates, occasional counters near RejectAfterMessages and resets.
    [Fact]
    public void Accept_200kRandomOperations_MatchesReferenceModel()
    {
        const int seed = 6479;
        const int operations = 200_000;
        _out.WriteLine($"seed {seed}, WindowSize {W}, RejectAfterMessages {R}");
        var rng = new Random(seed);
        var w = new ReplayWindow();
        var model = new Model(W, R);
        var recent = new ulong[64];
        int recentCount = 0;
        int accepted = 0, rejected = 0;
        for (int op = 0; op < operations; op++)
        {
            ulong h = model.Highest;
            int kind = rng.Next(1000);
            ulong c;
            if (kind < 500) c = h + (ulong)rng.Next(0, 40);                          // just ahead / at top
            else if (kind < 800) c = Sub(h, (ulong)rng.Next(0, (int)Math.Min(W + 80, int.MaxValue)));  // inside, at and past the edge
            else if (kind < 900 && recentCount > 0) c = recent[rng.Next(Math.Min(recentCount, recent.Length))];  // duplicate
            else if (kind < 960) c = h + (ulong)rng.Next(1, (int)Math.Min(W * 3, int.MaxValue));   // jump
            else if (kind < 975) c = h + (ulong)rng.NextInt64(1, 1L << 40);             // far jump
            else if (kind < 985) c = unchecked(R - 8 + (ulong)rng.Next(0, 12));          // R-8 .. R+3
            else if (kind < 995) c = (ulong)rng.NextInt64();                              // anywhere
            else
            {
                w.Reset();
                model.Reset();
                continue;
            }

            bool expected = model.CanAccept(c);
            bool can1 = w.CanAccept(c);
            bool can2 = w.CanAccept(c);
            if (can1 != expected || can2 != expected)
                Assert.Fail($"seed {seed} op {op}: CanAccept({c}) = {can1}/{can2}, expected {expected}; highest {model.HighestText}");
            bool got = w.Accept(c);
            model.Accept(c);
            if (got != expected)
                Assert.Fail($"seed {seed} op {op}: Accept({c}) = {got}, expected {expected}; highest before {h}");
            if (got)
            {
                accepted++;
                recent[recentCount++ % recent.Length] = c;
            }
            else rejected++;

            // Once at the limit nothing more is accepted; start over so the run stays useful.
            if (model.Highest >= R - 16 && rng.Next(8) == 0) { w.Reset(); model.Reset(); }
        }
        _out.WriteLine($"accepted {accepted}, rejected {rejected}");
        Assert.True(accepted > operations / 4 && rejected > operations / 10, $"seed {seed}: poor mix, accepted {accepted} rejected {rejected}");
    }

    private static ulong Sub(ulong a, ulong b) => a >= b ? a - b : 0;

    // Reference model: HashSet of accepted counters plus the highest accepted.
    private sealed class Model(ulong windowSize, ulong rejectAfter)
    {
        private readonly HashSet<ulong> _seen = [];
        private bool _any;

        internal ulong Highest { get; private set; }
        internal string HighestText => _any ? Highest.ToString() : "(none)";

        internal bool CanAccept(ulong c)
        {
            if (c >= rejectAfter || _seen.Contains(c)) return false;
            if (!_any || c >= Highest) return true;
            return Highest - c < windowSize;  // c >= highest - W + 1, without underflow
        }

        internal bool Accept(ulong c)
        {
            if (!CanAccept(c)) return false;
            _seen.Add(c);
            if (!_any || c > Highest) Highest = c;
            _any = true;
            if (_seen.Count > 4 * (int)Math.Min(windowSize, 1 << 20)) _seen.RemoveWhere(x => Highest - x >= windowSize);
            return true;
        }

        internal void Reset()
        {
            _seen.Clear();
            _any = false;
            Highest = 0;
        }
    }
}
