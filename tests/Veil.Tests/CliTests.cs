namespace Veil.Tests;

public class CliTests
{
    [Fact]
    public void GenKey_PubKey_RoundTrip()
    {
        var o = new StringWriter();
        Assert.Equal(0, Cli.GenKey(o));
        string priv = o.ToString().Trim();
        Assert.True(Key32.TryParseBase64(priv, out Key32 k));
        Assert.Equal(248 & k[0], k[0]);                 // clamped
        var pub = new StringWriter();
        Assert.Equal(0, Cli.PubKey(new StringReader(priv + "\n"), pub, new StringWriter()));
        Key32 expect = default;
        X25519.PublicKey(expect, k);
        Assert.Equal(expect.ToBase64(), pub.ToString().Trim());
    }

    [Fact]
    public void PubKey_Garbage_Exit2OneLine()
    {
        var err = new StringWriter();
        Assert.Equal(2, Cli.PubKey(new StringReader("hello\n"), new StringWriter(), err));
        Assert.Single(err.ToString().Trim().Split('\n'));
        Assert.Equal(2, Cli.PubKey(new StringReader(""), new StringWriter(), new StringWriter()));
    }

    [Fact]
    public void GenPsk_32RandomBytes()
    {
        var a = new StringWriter();
        var b = new StringWriter();
        Cli.GenPsk(a);
        Cli.GenPsk(b);
        Assert.Equal(32, Convert.FromBase64String(a.ToString().Trim()).Length);
        Assert.NotEqual(a.ToString(), b.ToString());
    }

    [Fact]
    public void Status_NoDaemon_Exit1()
    {
        var err = new StringWriter();
        Assert.Equal(1, Cli.Ask("status", new[] { "status", "--control", "/tmp/veil-no-such-" + Guid.NewGuid() + ".sock" }, new StringWriter(), err));
        Assert.Contains("no daemon", err.ToString());
    }

    [Fact]
    public void Status_BadArgument_Exit2()
    {
        Assert.Equal(2, Cli.Ask("status", new[] { "status", "--frobnicate" }, new StringWriter(), new StringWriter()));
        Assert.Equal(2, Cli.Ask("down", new[] { "down", "--json" }, new StringWriter(), new StringWriter()));
    }

    [Fact]
    public void Main_UnknownVerbAndHelp()
    {
        Assert.Equal(2, Program.Main(new[] { "frobnicate" }));
        Assert.Equal(0, Program.Main(new[] { "help" }));
        Assert.Equal(0, Program.Main(new[] { "help", "up" }));
        Assert.Equal(2, Program.Main(new[] { "help", "nothing" }));
        Assert.Equal(0, Program.Main(new[] { "version" }));
    }

    // Every verb Main dispatches (Program.Main's switch), each with a help topic and in the overview.
    private static readonly string[] Verbs = ["genkey", "pubkey", "genpsk", "genadmin", "adminpub", "up", "init", "invite", "join", "add-peer", "doctor",
        "service", "revoke", "status", "peers", "routes", "reload", "down", "netcheck", "health", "ping", "version", "bench", "selftest", "completion", "help"];

    [Fact]
    public void Help_EveryCommandHasATopic_AndTheOverviewNamesIt()
    {
        var overview = new StringWriter();
        Cli.Help(null, overview);
        foreach (string v in Verbs)
        {
            var o = new StringWriter();
            Assert.True(Cli.Help(v, o) == 0, $"no 'veil help {v}'");
            Assert.StartsWith("usage: veil ", o.ToString());
            Assert.Matches($@"\n  (\S+, )*{System.Text.RegularExpressions.Regex.Escape(v)}\b", overview.ToString());
        }
    }

    [Fact]
    public void Completion_Bash_CompletesCommandsAndFlags()
    {
        var script = new StringWriter();
        Assert.Equal(0, Cli.Completion("bash", script, new StringWriter()));
        string path = Path.Combine(Path.GetTempPath(), $"veil-completion-{Environment.ProcessId}.bash");
        File.WriteAllText(path, script.ToString());
        try
        {
            string Complete(string words, int cword)
            {
                var psi = new System.Diagnostics.ProcessStartInfo("bash", ["-c", $"source {path}; COMP_WORDS=({words}); COMP_CWORD={cword}; _veil; echo \"${{COMPREPLY[*]}}\""])
                    { RedirectStandardOutput = true, RedirectStandardError = true };
                using var p = System.Diagnostics.Process.Start(psi)!;
                string output = p.StandardOutput.ReadToEnd().Trim();
                p.WaitForExit();
                Assert.True(p.ExitCode == 0, p.StandardError.ReadToEnd());
                return output;
            }
            Assert.Equal("status", Complete("veil stat", 1));
            Assert.Equal("--mtu", Complete("veil up --mt", 2));
            Assert.Equal("--healthz-grace", Complete("veil up --key k --healthz", 4));
            Assert.Equal("--short", Complete("veil status --sh", 2));
            Assert.Equal("add-peer", Complete("veil help add", 2));
        }
        finally { File.Delete(path); }
        var err = new StringWriter();
        Assert.Equal(2, Cli.Completion("ash", new StringWriter(), err));
        Assert.Contains("no programmable completion", err.ToString());
    }

    [Fact]
    public void Help_Up_ListsEveryFlag()
    {
        var o = new StringWriter();
        Cli.Help("up", o);
        foreach (string f in new[] { "--key", "--listen", "--address", "--tun", "--peer", "--allow", "--psk", "--mtu", "--keepalive", "--rekey-after", "--control", "--log-level", "--workers" })
            Assert.Contains(f, o.ToString());
    }

    [Fact]
    public void Bench_PrintsEveryMeasurement_WithPositiveRates()
    {
        var o = new StringWriter();
        Assert.Equal(0, Bench.Run(["bench", "0.01"], o));
        string[] lines = o.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries);
        string[] expect =
        [
            "aead ChaCha20Poly1305    64 B", "aead ChaCha20Poly1305  1420 B", "aead ChaCha20Poly1305  9000 B",
            "trie      10 prefixes", "trie    1000 prefixes", "trie  100000 prefixes",
            "handshake (both sides, one core)", "hello flood: wrong MAC1 dropped", "hello flood: cookie replies", "x25519",
        ];
        foreach (string e in expect)
        {
            string line = Assert.Single(lines, l => l.StartsWith(e, StringComparison.Ordinal));
            var rate = System.Text.RegularExpressions.Regex.Match(line[e.Length..], @"([0-9][0-9,]*)/s");
            Assert.True(rate.Success && long.Parse(rate.Groups[1].Value.Replace(",", "")) > 0, line);
        }
    }

    [Fact]
    public void SelfTest_OnThisHost_EveryCheckPasses()
    {
        var o = new StringWriter();
        Assert.Equal(0, SelfTest.Run(o));
        string[] lines = o.ToString().Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal("selftest: all passed", lines[^1]);
        Assert.Equal(11, lines.Length - 1);                    // x25519, 2 AEADs x 3 implementations, hkdf, noise, epoll, udp
        Assert.All(lines[..^1], l => Assert.StartsWith("ok   ", l));
    }
}
