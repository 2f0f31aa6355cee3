namespace Veil.Tests;

// Several [[network]] tables in one file (UpConfig.LoadAll) and what the Host makes of the
// networks' answers (Combine, MergeMetrics). The daemon itself runs in tests/netns/networks.sh.
public sealed class NetworksTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("veil-nets-").FullName;
    private readonly string _peerPub;

    public NetworksTests()
    {
        foreach (string f in new[] { "a.key", "work.psk", "home.psk" })
        {
            string path = Path.Combine(_dir, f);
            File.WriteAllText(path, TestNode.KeyFromSeed((byte)(f.Length + f[0])).ToBase64() + "\n");
            File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        }
        Key32 pub = default, priv = TestNode.KeyFromSeed(8);
        X25519.PublicKey(pub, priv);
        _peerPub = pub.ToBase64();
    }

    public void Dispose() => Directory.Delete(_dir, true);

    private const string Two = """
        key = "a.key"
        control = "/run/veil/node.sock"
        keepalive = 9

        [[network]]
        name = "work"
        psk = "work.psk"
        listen = "0.0.0.0:51820"
        address = ["100.64.0.1/24"]
        mesh = true

        [[network.peer]]
        public_key = "PEERPUB"
        allowed_ips = ["100.64.0.2/32"]

        [[network]]
        name = "home"
        mode = "tap"
        tun = "veil-home"
        psk = "home.psk"
        listen = "0.0.0.0:51821"
        address = ["100.64.1.1/24"]
        keepalive = 4
        """;

    private string Write(string text)
    {
        string path = Path.Combine(_dir, "veil.toml");
        File.WriteAllText(path, text.Replace("PEERPUB", _peerPub));
        return path;
    }

    private List<UpConfig> Load(string text, params string[] flags) => UpConfig.LoadAll(["up", "--config", Write(text), .. flags], 1);

    [Fact]
    public void TwoNetworks_EachItsOwn_DefaultsFromAbove()
    {
        List<UpConfig> all = Load(Two);
        Assert.Equal(["work", "home"], all.Select(c => c.NetworkName));
        UpConfig work = all[0], home = all[1];
        Assert.Equal("work", work.TunName);                  // the interface defaults to the network's name
        Assert.Equal("veil-home", home.TunName);
        Assert.Equal(L2Mode.Tun, work.Mode);
        Assert.Equal(L2Mode.Tap, home.Mode);
        Assert.Equal((51820, 51821), (work.ListenPort, home.ListenPort));
        Assert.Single(work.Peers);
        Assert.Empty(home.Peers);                            // a [[network.peer]] is its network's alone
        Assert.Equal(9000, work.PersistentKeepaliveMs);      // from above the first [[network]]
        Assert.Equal(4000, home.PersistentKeepaliveMs);      // its own wins
        Assert.NotEqual(work.Psk.ToBase64(), home.Psk.ToBase64());
        Assert.Equal(work.PublicKey.ToBase64(), home.PublicKey.ToBase64());
        Assert.Equal("/run/veil/node.work.sock", work.ControlPath);
        Assert.Equal("/run/veil/node.home.sock", home.ControlPath);
        Assert.Equal("/run/veil/node.sock", home.HostControlPath);
        Assert.Equal(Path.Combine(_dir, "state.work"), work.StatePath);
        Assert.Equal(Path.Combine(_dir, "revoked.home"), home.RevocationsPath);
        Assert.Equal("", work.Name);                         // a network's name is not the node's
    }

    [Fact]
    public void NoNetworks_OneConfig_AsBefore()
    {
        List<UpConfig> all = Load("key = \"a.key\"\naddress = [\"100.64.0.1/24\"]\n");
        Assert.Single(all);
        Assert.Null(all[0].NetworkName);
        Assert.Equal(Tune.DefaultControlPath, all[0].ControlPath);
    }

    [Theory]
    [InlineData("s/tun = \"veil-home\"/tun = \"work\"/", "'work' both use interface work")]
    [InlineData("s/51821/51820/", "both listen on port 51820")]
    [InlineData("s#100.64.1.1/24#100.64.0.9/16#", "overlap: 100.64.0.0/16 and 100.64.0.0/24")]
    [InlineData("s/name = \"home\"/name = \"work\"/", "veil.toml:17: key 'name': 'work' names another [[network]] too")]
    [InlineData("s/name = \"home\"/name = \"home net\"/", "must be 1 to 15 letters")]
    [InlineData("s/name = \"home\"/user = \"nobody\"/", "veil.toml:17: key 'user' is the node's, not a network's")]
    [InlineData("s/name = \"home\"/sname = \"x\"/", "veil.toml:16: [[network]] needs a name")]
    [InlineData("s/\\[\\[network.peer\\]\\]/[[peer]]/", "veil.toml:12: [[peer]] after a [[network]]: write [[network.peer]]")]
    [InlineData("s/^keepalive = 9/[[peer]]\\npublic_key = \"PEERPUB\"/", "veil.toml:3: with [[network]] tables, each [[peer]] belongs to one")]
    [InlineData("s#^keepalive = 9#network = [\"100.64.0.0/24\"]#", "veil.toml:5: 'network' is already a key")]
    public void BadNetworks_OneClearLine(string edit, string expected)
    {
        string text = Sed(Two, edit);
        var e = Assert.Throws<ConfigException>(() => Load(text));
        Assert.Contains(expected, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void NetworkPeerFirst_Refused()
    {
        var e = Assert.Throws<ConfigException>(() => Load("key = \"a.key\"\n[[network.peer]]\npublic_key = \"PEERPUB\"\n"));
        Assert.Equal("veil.toml:2: [[network.peer]] must follow the [[network]] it belongs to", e.Message);
    }

    [Fact]
    public void Flags_OnlyNodeWide()
    {
        Assert.Equal(2, Load(Two, "--log-level", "debug", "--control", "/tmp/x.sock").Count);
        Assert.Equal("/tmp/x.home.sock", Load(Two, "--control", "/tmp/x.sock")[1].ControlPath);
        var e = Assert.Throws<ConfigException>(() => Load(Two, "--tun", "x"));
        Assert.StartsWith("--tun: veil.toml holds [[network]] tables; set tun in the one it belongs to", e.Message);
        e = Assert.Throws<ConfigException>(() => Load(Two, "--peer", _peerPub + "@198.51.100.2:51820"));
        Assert.StartsWith("--peer: veil.toml holds [[network]] tables", e.Message);
    }

    [Fact]
    public void Load_PicksTheRunningNetwork_OrSaysWhy()
    {
        string path = Write(Two);
        List<UpConfig> all = UpConfig.LoadAll(["up", "--config", path], 1);
        UpConfig next = UpConfig.Load(["up", "--config", path], 1, all[1]);
        Assert.Equal("home", next.NetworkName);
        Assert.Equal(4000, next.PersistentKeepaliveMs);
        File.WriteAllText(path, Two.Replace("name = \"home\"", "name = \"family\"").Replace("PEERPUB", _peerPub));
        var e = Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--config", path], 1, all[1]));
        Assert.Contains("no longer has [[network]] 'home': adding or removing a network needs a restart", e.Message);
        // Tools that read one node's file (add-peer, doctor) are told, not given the first network.
        e = Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--config", path], 1));
        Assert.Contains("holds [[network]] tables", e.Message);
    }

    [Fact]
    public void NetworkControlPath_BesideTheNodes()
    {
        Assert.Equal("/var/run/veil.mgmt.sock", UpConfig.NetworkControlPath("/var/run/veil.sock", "mgmt"));
        Assert.Equal("/tmp/ctl.mgmt", UpConfig.NetworkControlPath("/tmp/ctl", "mgmt"));
    }

    [Fact]
    public void MergeMetrics_EachFamilyOnce_EverySampleLabelled()
    {
        string a = "# HELP veil_peers Peers.\n# TYPE veil_peers gauge\nveil_peers{state=\"up\"} 1\nveil_peers{state=\"down\"} 0\n# HELP veil_sessions S.\n# TYPE veil_sessions gauge\nveil_sessions 2\n";
        string b = "# HELP veil_peers Peers.\n# TYPE veil_peers gauge\nveil_peers{state=\"up\"} 3\nveil_peers{state=\"down\"} 1\n# HELP veil_sessions S.\n# TYPE veil_sessions gauge\nveil_sessions 5\n# HELP veil_switch_macs M.\n# TYPE veil_switch_macs gauge\nveil_switch_macs{} 7\n";
        string m = Host.MergeMetrics([("work", a), ("home", b)]);
        Assert.Equal("""
            # HELP veil_peers Peers.
            # TYPE veil_peers gauge
            veil_peers{network="work",state="up"} 1
            veil_peers{network="work",state="down"} 0
            veil_peers{network="home",state="up"} 3
            veil_peers{network="home",state="down"} 1
            # HELP veil_sessions S.
            # TYPE veil_sessions gauge
            veil_sessions{network="work"} 2
            veil_sessions{network="home"} 5
            # HELP veil_switch_macs M.
            # TYPE veil_switch_macs gauge
            veil_switch_macs{network="home"} 7

            """.Replace("\r", ""), m);
    }

    [Fact]
    public void Combine_JsonUnderNames_VerdictIsTheWorst()
    {
        string[] names = ["work", "home"];
        Assert.Equal("{\"networks\":{\"work\":{\"a\":1},\"home\":null}}\n", Host.Combine("status json", names, ["{\"a\":1}\n", null]));
        Assert.Equal("ok: work: ok: 1 of 1 peers up; home: ok: 2 of 2 peers up\n", Host.Combine("health", names, ["ok: 1 of 1 peers up\n", "ok: 2 of 2 peers up\n"]));
        Assert.StartsWith("down: ", Host.Combine("health", names, ["ok: 1 of 1 peers up\n", "down: no peers\n"]));
        Assert.StartsWith("error: ", Host.Combine("reload", names, ["restart: changing tun needs a restart\n", "error: bad\n"]));
        Assert.StartsWith("restart: ", Host.Combine("reload", names, ["ok: reloaded: 1 peers\n", "restart: changing tun needs a restart\n"]));
        Assert.StartsWith("error: ", Host.Combine("health", names, ["ok: 1 of 1 peers up\n", ""]));   // a network that stopped
        Assert.Equal("network work\nA\n\nnetwork home\nB\n", Host.Combine("status", names, ["A\n", "B"]));
    }

    // The edits the theory names, as sed would make them: s/OLD/NEW/ (also with #), ^ anchoring a line.
    private static string Sed(string text, string edit)
    {
        char sep = edit[1];
        string[] p = edit[2..^1].Split(sep);
        string from = p[0].Replace("\\[", "[").Replace("\\]", "]").Replace("\\/", "/"), to = p[1].Replace("\\n", "\n").Replace("\\/", "/");
        if (from.StartsWith('^'))
        {
            string[] lines = text.Split('\n');
            int i = Array.FindIndex(lines, l => l.StartsWith(from[1..]));
            lines[i] = to + lines[i][(from.Length - 1)..];
            return string.Join('\n', lines);
        }
        int at = text.IndexOf(from);
        Assert.True(at >= 0, edit);
        return text[..at] + to + text[(at + from.Length)..];
    }
}
