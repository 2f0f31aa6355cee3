using System.Text.Json;

namespace Veil.Tests;

/// <summary>§3 Log: levels, the per-event budget, the daemon's queued writer, JSON lines.</summary>
public sealed class LogTests
{
    private static string[] Lines(StringWriter w) => w.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries);

    [Fact]
    public void Levels_FilterAndWarningsGoToTheErrorStream()
    {
        var o = new StringWriter();
        var e = new StringWriter();
        var log = new Log(o, e, LogLevel.Info);
        log.Debug("d", "x=1");
        log.Info("i", "x=2");
        log.Warn("w", "x=3");
        log.Error("err", "");
        Assert.Single(Lines(o));
        Assert.Matches(@"^ts=\S+Z level=info event=i x=2$", Lines(o)[0]);
        Assert.Equal(2, Lines(e).Length);
        Assert.EndsWith("level=error event=err", Lines(e)[1]);
    }

    [Fact]
    public void Budget_TenLinesPerEventThenCountedOnce()
    {
        var o = new StringWriter();
        var log = new Log(o, LogLevel.Info);
        for (int i = 0; i < 25; i++) log.Info("flood", $"n={i}");
        log.Info("other", "");                                        // another event has its own budget
        Assert.Equal(Tune.LogBurst + 1, Lines(o).Length);
        Assert.False(log.Wants(LogLevel.Info, "flood"));              // a caller on the packet path asks first
        Assert.True(log.Wants(LogLevel.Info, "fresh"));
    }

    [Fact]
    public void QueuedWriter_WritesEverythingInOrder_AndStopDrains()
    {
        var o = new StringWriter();
        var log = new Log(o, LogLevel.Info);
        log.StartWriter();
        var threads = new Thread[4];
        for (int t = 0; t < threads.Length; t++)
        {
            int id = t;
            threads[t] = new Thread(() => { for (int i = 0; i < 8; i++) log.Info($"t{id}", $"i={i}"); });
            threads[t].Start();
        }
        foreach (Thread t in threads) t.Join();
        log.StopWriter();
        string[] lines = Lines(o);
        Assert.Equal(32, lines.Length);
        for (int t = 0; t < threads.Length; t++)                    // each thread's lines whole and in order
        {
            var mine = lines.Where(l => l.Contains($"event=t{t} ")).Select(l => l[(l.IndexOf("i=") + 2)..]).ToArray();
            Assert.Equal(Enumerable.Range(0, 8).Select(i => i.ToString()), mine);
        }
        log.Info("after", "");                                        // stopped: written at once again
        Assert.EndsWith("event=after", Lines(o)[^1]);
    }

    // A writer stuck on a slow reader never blocks whoever logs: lines past the queue's bound are
    // dropped, counted, and reported once the reader catches up.
    [Fact]
    public void QueuedWriter_SlowReader_LoggersNeverWait_LostLinesReported()
    {
        var gate = new ManualResetEventSlim(false);
        var slow = new BlockingWriter(gate);
        var log = new Log(slow, LogLevel.Info);
        log.StartWriter();
        log.Info("first", "");                                        // the writer takes it and blocks
        Assert.True(SpinWait.SpinUntil(() => slow.Blocked, 5_000));
        int sent = Tune.LogQueueLines + 100;
        var logger = new Thread(() => { for (int i = 0; i < sent; i++) log.Info($"e{i}", ""); });   // distinct events: no budget
        logger.Start();
        bool finished = logger.Join(30_000);                            // the reader is still stuck meanwhile
        gate.Set();
        Assert.True(finished, "a logger waited for the slow reader");
        log.StopWriter();
        string[] lines = slow.Text.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal(1 + Tune.LogQueueLines + 1, lines.Length);      // first, a full queue, and the report
        Assert.Contains("event=log_lost lines=100", lines[^1]);
    }

    private sealed class BlockingWriter(ManualResetEventSlim gate) : TextWriter
    {
        internal readonly StringWriter Text = new();
        internal volatile bool Blocked;
        public override System.Text.Encoding Encoding => System.Text.Encoding.UTF8;
        public override void Write(char value) => Text.Write(value);
        public override void WriteLine(string? value)
        {
            if (!gate.IsSet) { Blocked = true; gate.Wait(); }
            Text.WriteLine(value);
        }
    }

    [Fact]
    public void JsonLine_OneEscaperForQuotesBackslashesAndControlCharacters()
    {
        string line = Log.JsonLine("2026-01-01T00:00:00.000Z", LogLevel.Warn, "e", "a=\"x\\\\y\" b=tab\there c=plain from=192.0.2.1:5 hint=\"the \\\"sender\\\" does not know\"");
        using JsonDocument doc = JsonDocument.Parse(line);
        Assert.Equal("warn", doc.RootElement.GetProperty("level").GetString());
        Assert.Equal("e", doc.RootElement.GetProperty("event").GetString());
        Assert.Equal("192.0.2.1:5", doc.RootElement.GetProperty("from").GetString());
        Assert.Equal("x\\\\y", doc.RootElement.GetProperty("a").GetString());
        Assert.Equal("tab\there", doc.RootElement.GetProperty("b").GetString());
        Assert.Equal("plain", doc.RootElement.GetProperty("c").GetString());
        var sb = new System.Text.StringBuilder();
        JsonText.Str(sb, "q\"\u0001");
        Assert.Equal("\"q\\\"\\u0001\"", sb.ToString());
    }
}

public sealed class HookTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("veil-hook-").FullName;
    public void Dispose() => Directory.Delete(_dir, true);

    private string Script(string body)
    {
        string path = Path.Combine(_dir, "hook.sh");
        File.WriteAllText(path, "#!/bin/sh\n" + body + "\n");
        File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        return path;
    }

    [Fact]
    public void Fields_KeyValuePairs_QuotedValuesWhole()
    {
        Assert.Equal([("peer", "b"), ("endpoint", "[2001:db8::1]:51820"), ("hint", "two words"), ("path", "relay:c")],
            Log.Fields("peer=b endpoint=[2001:db8::1]:51820 hint=\"two words\" path=relay:c"));
        Assert.Empty(Log.Fields(""));
    }

    [Fact]
    public void Hook_RunsAsArgvWithTheFieldsInTheEnvironment_OutputLogged_OthersIgnored()
    {
        string outFile = Path.Combine(_dir, "out.txt");
        string program = Script($"echo \"$1 $VEIL_EVENT $VEIL_PEER $VEIL_ENDPOINT\" >> {outFile}; echo said-hello");
        var text = new StringWriter();
        var log = new Log(TextWriter.Synchronized(text), LogLevel.Warn);   // peer_up is Info: not logged, still hooked
        using var hooks = new Hooks(new() { ["peer_up"] = program }, log);
        log.Hooks = hooks;
        log.Info("peer_down", "peer=x");                                   // no hook for it
        log.Info("peer_up", "peer=b endpoint=192.0.2.1:51820 path=direct");
        Assert.True(SpinWait.SpinUntil(() => hooks.Ran == 1, 10_000), "the hook did not run");
        Assert.Equal("peer_up peer_up b 192.0.2.1:51820\n", File.ReadAllText(outFile));
        Assert.Equal(0, hooks.Failed);
        hooks.SetPrograms(new() { ["peer_up"] = Script("exit 3") });
        log.Info("peer_up", "peer=b");
        Assert.True(SpinWait.SpinUntil(() => hooks.Failed == 1, 10_000), "the failing hook was not counted");
        Assert.True(SpinWait.SpinUntil(() => text.ToString().Contains("event=hook_failed event=peer_up"), 5_000), text.ToString());
    }

    // OpenWrt's init script hands every event to hotplug-call with one `--hook all=...`; an event
    // with a hook of its own runs that one instead, and log lines that are not events run nothing.
    [Fact]
    public void Hook_All_EveryEventWithoutItsOwn_NotOtherLogLines()
    {
        string outFile = Path.Combine(_dir, "all.txt");
        string all = Script($"echo \"all $1 $VEIL_PUBLIC_KEY\" >> {outFile}");
        string own = Path.Combine(_dir, "own.sh");
        File.WriteAllText(own, $"#!/bin/sh\necho \"own $1\" >> {outFile}\n");
        File.SetUnixFileMode(own, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        var log = new Log(TextWriter.Null, LogLevel.Info);
        using var hooks = new Hooks(UpConfig.Load(["up", "--key", KeyFile(), "--address", "100.64.0.1/24", "--hook", "all=" + all, "--hook", "peer_up=" + own], 1).HookPrograms, log);
        log.Hooks = hooks;
        log.Info("started", "tun=veil0");                                  // a log line, not an event
        log.Info("peer_joined", "peer=bee public_key=AAAA+/== allowed_ips=100.64.0.5/32");
        log.Info("peer_up", "peer=bee");
        Assert.True(SpinWait.SpinUntil(() => hooks.Ran == 2, 10_000), "the hooks did not run");
        Assert.Equal("all peer_joined AAAA+/==\nown peer_up\n", File.ReadAllText(outFile));
    }

    // The runner behind hooks, beacon commands and systemctl (posix_spawnp, not System.Diagnostics.Process).
    [Fact]
    public void Spawn_InputOutputExitCodeAndEnvironment()
    {
        string[] env = Spawn.Environment([("VEIL_X", "one two")]);
        Assert.Contains("VEIL_X=one two", env);
        Assert.Contains(env, e => e.StartsWith("PATH="));                   // ours, passed on
        var p = Spawn.Run(["sh", "-c", "echo \"$VEIL_X\"; tr a-z A-Z; echo oops >&2; exit 7"], env, "piped in\n", withStderr: false, 1024, 10_000);
        Assert.Equal(new Spawn.Exit(7, false, "one two\nPIPED IN\n"), p);
        p = Spawn.Run(["sh", "-c", "echo out; echo err >&2"], env, null, withStderr: true, 1024, 10_000);
        Assert.Equal((0, false), (p.Code, p.TimedOut));
        Assert.Equal(["err", "out"], p.Output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Order());
        // 1 MiB in and out through pipes of 64 KiB: nothing deadlocks, the output stops at the bound.
        string big = new('x', 1 << 20);
        p = Spawn.Run(["cat"], env, big, withStderr: false, 100_000, 10_000);
        Assert.Equal((0, 100_000), (p.Code, p.Output.Length));
        Assert.Equal(128 + 9, Spawn.Run(["sh", "-c", "kill -9 $$"], env, null, false, 1024, 10_000).Code);   // killed: 128 + signal
        var e = Assert.Throws<IOException>(() => Spawn.Run(["/no/such/program"], env, null, false, 1024, 10_000));
        Assert.Contains("cannot run /no/such/program", e.Message);
    }

    [Fact]
    public void Spawn_DefaultSignals_TimeoutKillsTheWholeGroup()
    {
        // The runtime ignores SIGPIPE; a child that kept that would see EPIPE and complain instead of
        // dying quietly the way a shell pipeline expects.
        var p = Spawn.Run(["sh", "-c", "yes | head -n 1"], Spawn.Environment([]), null, withStderr: true, 1024, 10_000);
        Assert.Equal(new Spawn.Exit(0, false, "y\n"), p);
        string marker = Path.Combine(_dir, "grandchild");
        p = Spawn.Run(["sh", "-c", $"(sleep 3; touch {marker}) & echo started; sleep 30"], Spawn.Environment([]), null, false, 1024, 500);
        Assert.Equal((-1, true, "started\n"), (p.Code, p.TimedOut, p.Output));
        Thread.Sleep(3500);
        Assert.False(File.Exists(marker), "the background child outlived the timeout");
    }

    private string KeyFile()
    {
        string key = Path.Combine(_dir, "k");
        File.WriteAllText(key, TestNode.KeyFromSeed(3).ToBase64() + "\n");
        File.SetUnixFileMode(key, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        return key;
    }

    [Theory]
    [InlineData("peer_sideways=/bin/true", "must be EVENT=PROGRAM")]
    [InlineData("peer_up=true", "needs the absolute path of a program that exists")]
    [InlineData("peer_up=/no/such/program", "needs the absolute path of a program that exists")]
    public void Hook_BadFlag_Refused(string value, string why)
    {
        var e = Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--key", KeyFile(), "--address", "100.64.0.1/24", "--hook", value], 1));
        Assert.Contains(why, e.Message);
    }
}
