namespace Veil.Tests;

public sealed class TomlTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("veil-toml-").FullName;
    private readonly string _key;
    private readonly string _peerPub;

    public TomlTests()
    {
        _key = Path.Combine(_dir, "a.key");
        File.WriteAllText(_key, TestNode.KeyFromSeed(4).ToBase64() + "\n");
        File.SetUnixFileMode(_key, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        Key32 pub = default, priv = TestNode.KeyFromSeed(8);
        X25519.PublicKey(pub, priv);
        _peerPub = pub.ToBase64();
    }

    public void Dispose() => Directory.Delete(_dir, true);

    private string Write(string text)
    {
        string path = Path.Combine(_dir, "veil.toml");
        File.WriteAllText(path, text.Replace("KEYFILE", _key).Replace("PEERPUB", _peerPub));
        return path;
    }

    [Fact]
    public void Parse_AllValueKinds()
    {
        TomlDoc d = TomlDoc.Parse("""
            # comment
            a = "x\"y\\z\u0041"   # trailing comment
            b = 'C:\raw'
            c = -12_000
            d = true
            e = [ "1", "2",
                  # inside
                  "3", ]
            [[peer]]
            a = 1
            [[peer]]
            a = 2
            """, "t.toml");
        Assert.Equal("x\"y\\zA", d.Root["a"].Str);
        Assert.Equal(@"C:\raw", d.Root["b"].Str);
        Assert.Equal(-12000, d.Root["c"].Int);
        Assert.True(d.Root["d"].Bool);
        Assert.Equal(new[] { "1", "2", "3" }, d.Root["e"].Items.Select(i => i.Str));
        Assert.Equal(2, d.TableArrays["peer"].Count);
        Assert.Equal(2, d.TableArrays["peer"][1]["a"].Int);
        Assert.Equal(10, d.TableArrays["peer"][0]["a"].Line);
    }

    [Theory]
    [InlineData("a = \"x\"\na = \"y\"", "t.toml:2: key 'a' is given twice")]
    [InlineData("a = \"unterminated", "t.toml:1: unterminated string")]
    [InlineData("a = ", "t.toml:1: missing value")]
    [InlineData("a = 1 2", "t.toml:1: unexpected '2' after the value")]
    [InlineData("= 1", "t.toml:1: expected a key")]
    [InlineData("a 1", "t.toml:1: expected '=' after key 'a'")]
    [InlineData("[node]\na = 1", "t.toml:1: table [node] is not known")]
    [InlineData("a = [1, 2", "t.toml:1: expected ',' or ']'")]
    [InlineData("a = \"\\q\"", "t.toml:1: unknown escape")]
    [InlineData("\n\na = nope", "t.toml:3: expected a string")]
    [InlineData("a = \"\\u 041\"", "t.toml:1: bad \\u escape")]       // four hex digits, no spaces or signs
    [InlineData("a = \"\\u+041\"", "t.toml:1: bad \\u escape")]
    [InlineData("a = " + "[[[[[[[[[1]]]]]]]]]", "t.toml:1: arrays nested too deep")]
    public void Parse_Errors_NameFileAndLine(string text, string expect)
    {
        var e = Assert.Throws<ConfigException>(() => TomlDoc.Parse(text, "t.toml"));
        Assert.StartsWith(expect, e.Message);
    }

    [Fact]
    public void Errors_ShowControlCharactersEscaped_OneLine()
    {
        // A value's "\n" escape lands in the error text (the key is unknown); it must not start a line.
        var e = Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--config", Write("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\\nveil: forged\"]\n")], 1));
        Assert.DoesNotContain('\n', e.Message);
        Assert.Contains("\\x0a", e.Message);
    }

    [Theory]
    [InlineData("--mut", "--mtu")]
    [InlineData("--keepalvie", "--keepalive")]
    [InlineData("--listn", "--listen")]
    [InlineData("--no-rely", "--no-relay")]
    [InlineData("--frobnicate", null)]
    public void UnknownFlag_DidYouMean(string typed, string? suggested)
    {
        var e = Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--key", _key, typed, "1"], 1));
        Assert.Equal($"unknown flag '{typed}'" + (suggested != null ? $", did you mean '{suggested}'?" : "") + " (see 'veil help up')", e.Message);
    }

    [Fact]
    public void UnknownKey_DidYouMean_InTheFileAndInAPeer()
    {
        var e = Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--config", Write("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\nkeepalve = 5\n")], 1));
        Assert.Equal("veil.toml:3: unknown key 'keepalve', did you mean 'keepalive'?", e.Message);
        e = Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--config", Write("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\n[[peer]]\npublic_key = \"PEERPUB\"\nallowed_ip = [\"100.64.0.2/32\"]\n")], 1));
        Assert.Equal("veil.toml:5: unknown key 'allowed_ip' in [[peer]], did you mean 'allowed_ips'?", e.Message);
    }

    [Fact]
    public void KeyFile_Directory_SaysSo()
    {
        var e = Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--key", _dir, "--address", "100.64.0.1/24"], 1));
        Assert.Equal($"--key '{_dir}': a directory, not a key file", e.Message);
    }

    [Fact]
    public void RelativePathsInTheFile_AreRelativeToTheFile_FlagsToTheWorkingDirectory()
    {
        string sub = Directory.CreateDirectory(Path.Combine(_dir, "etc")).FullName;
        File.Copy(_key, Path.Combine(sub, "private.key"));
        File.SetUnixFileMode(Path.Combine(sub, "private.key"), UnixFileMode.UserRead | UnixFileMode.UserWrite);
        File.Copy(_key, Path.Combine(sub, "net.psk"));
        File.SetUnixFileMode(Path.Combine(sub, "net.psk"), UnixFileMode.UserRead | UnixFileMode.UserWrite);
        string path = Path.Combine(sub, "veil.toml");
        File.WriteAllText(path, "key = \"private.key\"\npsk = \"net.psk\"\naddress = [\"100.64.0.1/24\"]\nstate = \"learned\"\nbeacon_load = \"| cat beacons\"\n");
        UpConfig c = UpConfig.Load(["up", "--config", path], 1);           // the working directory is not sub
        Assert.Equal(Path.Combine(sub, "private.key"), c.KeyFile);
        Assert.Equal(Path.Combine(sub, "net.psk"), c.PskFile);
        Assert.Equal(Path.Combine(sub, "learned"), c.StatePath);
        Assert.Equal("| cat beacons", c.BeaconLoad);                      // a command, not a path
        var e = Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--config", path, "--key", "private.key"], 1));
        Assert.Contains("--key 'private.key': cannot read: no such file", e.Message);
    }

    [Fact]
    public void LogFormatPlain_NoTimestamp()
    {
        UpConfig c = UpConfig.Load(["up", "--key", _key, "--address", "100.64.0.1/24", "--log-format", "plain"], 1);
        var sw = new StringWriter();
        var log = new Log(sw, LogLevel.Info) { Json = c.LogJson, NoTimestamps = c.LogNoTimestamps };
        log.Info("started", "peers=0");
        Assert.Equal("level=info event=started peers=0\n", sw.ToString());
    }

    [Fact]
    public void GenKey_WarnsWhenOthersCanReadTheFile()
    {
        string f = Path.Combine(_dir, "out.key");
        File.WriteAllText(f, "");
        File.SetUnixFileMode(f, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupRead | UnixFileMode.OtherRead);
        var err = new StringWriter();
        Cli.WarnIfOthersCanRead(err, f);
        Assert.StartsWith($"veil: warning: {f} can be read by group or others (mode 644)", err.ToString());
        File.SetUnixFileMode(f, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        err = new StringWriter();
        Cli.WarnIfOthersCanRead(err, f);
        Assert.Equal("", err.ToString());
    }

    [Fact]
    public void PortInUse_HintNamesTheOwner()
    {
        using var held = UdpSocket.Bind(System.Net.IPAddress.Loopback, 0);
        string? owner = Doctor.PortOwner(held.LocalPort);
        Assert.StartsWith($"pid {Environment.ProcessId} (", owner);
        UpConfig c = UpConfig.Load(["up", "--key", _key, "--address", "100.64.0.1/24", "--listen", $"127.0.0.1:{held.LocalPort}"], 1);
        Assert.StartsWith($"udp {held.LocalPort} belongs to pid {Environment.ProcessId} (", Doctor.HintFor("cannot listen on 127.0.0.1: Address in use (another process uses the port)", c));
        Assert.Equal("", Doctor.HintFor("something else", c));
    }

    [Fact]
    public void ConfigPath_Directory_SaysSo()
    {
        var e = Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--config", _dir], 1));
        Assert.Equal($"--config '{_dir}': a directory, not a file", e.Message);
    }

    [Fact]
    public void Parse_RandomText_OnlyConfigExceptions()
    {
        var rng = new Random(11);
        const string alphabet = "ab=\"'[]#,\n 1_-\\tu{}.";
        for (int i = 0; i < 3000; i++)
        {
            var chars = new char[rng.Next(0, 80)];
            for (int j = 0; j < chars.Length; j++) chars[j] = alphabet[rng.Next(alphabet.Length)];
            try { TomlDoc.Parse(new string(chars), "r.toml"); }
            catch (ConfigException) { }
        }
    }

    [Fact]
    public void ConfigFile_FullNode_ParsedWithPeers()
    {
        string path = Write("""
            key = "KEYFILE"
            listen = "[2001:db8::1]:4000"
            address = ["100.64.0.1/24", "fd00:64::1/64"]
            tun = "veil9"
            keepalive = 25
            mgmt = "off"
            mgmt_acl = ["192.0.2.0/24"]
            max_sessions = 64
            handshake_rate = 50
            handshake_rate_per_source = 5
            log_level = "warn"
            log_format = "json"

            [[peer]]
            name = "office"
            public_key = "PEERPUB"
            endpoint = "198.51.100.2:51820"
            allowed_ips = ["100.64.0.2/32", "192.168.20.0/24"]
            keepalive = 10
            """);
        UpConfig c = UpConfig.Load(new[] { "up", "--config", path }, 1);
        Assert.Equal(4000, c.ListenPort);
        Assert.Equal(2, c.Addresses.Count);
        Assert.Equal("veil9", c.TunName);
        Assert.Null(c.MgmtAddress);
        Assert.Equal("192.0.2.0/24", Assert.Single(c.MgmtAcl).ToString());
        Assert.Equal(64, c.MaxSessions);
        Assert.Equal(LogLevel.Warn, c.LogLevel);
        Assert.True(c.LogJson);
        PeerConfig p = Assert.Single(c.Peers);
        Assert.Equal("office", p.Name);
        Assert.Equal(10_000, p.KeepaliveMs);
        Assert.Equal(2, p.Allowed.Count);
    }

    [Fact]
    public void ConfigFile_TapModeAndMacLists()
    {
        string path = Write("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\nmode = \"tap\"\n[[peer]]\npublic_key = \"PEERPUB\"\nallowed_macs = [\"02:00:00:00:00:0a\"]");
        UpConfig c = UpConfig.Load(new[] { "up", "--config", path }, 1);
        Assert.Equal(L2Mode.Tap, c.Mode);
        Assert.Equal(0x02_00_00_00_00_0AUL, Assert.Single(Assert.Single(c.Peers).AllowedMacs));
    }

    [Fact]
    public void Flags_OverrideFile_AddressReplaced_PeersMerged()
    {
        Key32 other = default, otherPriv = TestNode.KeyFromSeed(9);
        X25519.PublicKey(other, otherPriv);
        string path = Write("""
            key = "KEYFILE"
            address = ["100.64.0.1/24"]
            tun = "fromfile"
            [[peer]]
            public_key = "PEERPUB"
            allowed_ips = ["100.64.0.2/32"]
            """);
        UpConfig c = UpConfig.Load(new[] { "up", "--config", path, "--tun", "fromflag", "--address", "100.64.0.7/24",
            "--peer", other.ToBase64(), "--allow", "100.64.0.9/32", "--peer", _peerPub, "--allow", "100.64.0.22/32" }, 1);
        Assert.Equal("fromflag", c.TunName);
        Assert.Equal("100.64.0.7/24", Assert.Single(c.Addresses).ToString());
        Assert.Equal(2, c.Peers.Count);
        Assert.Equal("100.64.0.22/32", Assert.Single(c.Peers.Single(p => p.PublicKey.ToBase64() == _peerPub).Allowed).ToString());
    }

    [Theory]
    [InlineData("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\nmtu = \"big\"", "veil.toml:3: key 'mtu': expected an integer")]
    [InlineData("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\nmtu = 10", "veil.toml:3: key 'mtu': '10' must be a whole number")]
    [InlineData("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\ncolour = \"red\"", "veil.toml:3: unknown key 'colour'")]
    [InlineData("key = \"KEYFILE\"\naddress = \"100.64.0.1/24\"", "veil.toml:2: key 'address': expected an array of strings")]
    [InlineData("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\n[[peer]]\nendpoint = \"198.51.100.2:1\"", "veil.toml:3: [[peer]] needs a public_key")]
    [InlineData("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\n[[peer]]\npublic_key = \"PEERPUB\"\nallowed_ips = [\"x\"]", "veil.toml:5: key 'allowed_ips': 'x' is not a CIDR prefix")]
    [InlineData("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\n[[peer]]\npublic_key = \"PEERPUB\"\ncolour = 1", "veil.toml:5: unknown key 'colour' in [[peer]]")]
    [InlineData("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\n[[node]]\na = 1", "veil.toml:3: table [[node]] is not known")]
    [InlineData("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\nmode = \"tup\"", "veil.toml:3: key 'mode': 'tup' must be tun, tap or hub")]
    [InlineData("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\nmode = \"tap\"\n[[peer]]\npublic_key = \"PEERPUB\"\nallowed_macs = [\"x\"]", "veil.toml:6: key 'allowed_macs': 'x' is not a unicast MAC")]
    [InlineData("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\n[[peer]]\npublic_key = \"PEERPUB\"\nisolated = \"yes\"", "veil.toml:5: key 'isolated': expected true or false")]
    public void ConfigFile_BadValues_NameFileLineAndKey(string text, string expect)
    {
        string path = Write(text);
        var e = Assert.Throws<ConfigException>(() => UpConfig.Load(new[] { "up", "--config", path }, 1));
        Assert.StartsWith(expect, e.Message);
    }

    // [[filter]] tables become the rules the flag takes, in file order (TOML refuses them beside a filter = [...] list).
    [Fact]
    public void ConfigFile_FilterTables_BecomeRules()
    {
        string path = Write("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\n" +
            "[[filter]]\ndirection = \"in\"\nproto = \"tcp\"\nport = 22\npeer = \"admin-*\"\n" +
            "[[filter]]\naction = \"deny\"\ndirection = \"out\"\nproto = \"udp\"\nport = \"1000-2000\"\npeer = \"lab\"\n" +
            "[[filter]]\ndirection = \"out\"\n");
        Assert.Equal(["in tcp 22 from admin-*", "deny out udp 1000-2000 to lab", "out any"], UpConfig.Load(new[] { "up", "--config", path }, 1).Filters);
    }

    [Theory]
    [InlineData("[[filter]]\nproto = \"tcp\"", "veil.toml:3: [[filter]] needs a direction (\"in\" or \"out\")")]
    [InlineData("[[filter]]\ndirection = \"in\"\nprot = \"tcp\"", "veil.toml:5: unknown key 'prot' in [[filter]], did you mean 'proto'?")]
    [InlineData("[[filter]]\ndirection = \"in\"\nproto = \"sctp\"", "veil.toml:3: [[filter]]: filter 'in sctp': 'sctp' is not tcp, udp, icmp or any")]
    [InlineData("[[filter]]\ndirection = \"in\"\nproto = \"icmp\"\nport = 22", "veil.toml:3: [[filter]]: filter 'in icmp 22': ports go with tcp or udp")]
    [InlineData("[[filter]]\ndirection = \"in out\"", "veil.toml:4: key 'direction': expected one word")]
    [InlineData("[[filter]]\ndirection = 1", "veil.toml:4: key 'direction': expected a string")]
    [InlineData("filter = [\"in icmp\"]\n[[filter]]\ndirection = \"in\"", "veil.toml:4: 'filter' is already a key")]
    public void ConfigFile_BadFilterTable_FileLineAndReason(string table, string expect)
    {
        string path = Write("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\n" + table + "\n");
        Assert.Equal(expect, Assert.Throws<ConfigException>(() => UpConfig.Load(new[] { "up", "--config", path }, 1)).Message);
    }

    // A peer's own secret: a file beside the config (relative to it), mode 0600 like every secret.
    [Fact]
    public void ConfigFile_PeerPsk_RelativeToTheFile_ModeChecked()
    {
        string secret = Convert.ToBase64String(Enumerable.Range(1, 32).Select(i => (byte)i).ToArray());
        string file = Path.Combine(_dir, "peer-guest.psk");
        File.WriteAllText(file, secret + "\n");
        File.SetUnixFileMode(file, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        string path = Write("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\n[[peer]]\npublic_key = \"PEERPUB\"\npsk = \"peer-guest.psk\"\n");
        PeerConfig p = Assert.Single(UpConfig.Load(new[] { "up", "--config", path }, 1).Peers);
        Assert.Equal(file, p.PskFile);
        Assert.Equal(secret, p.Psk.ToBase64());
        // A reload naming the same file does not read it again (after --user it may not be able to):
        // the node keeps the secret it holds.
        UpConfig running = UpConfig.Load(new[] { "up", "--config", path }, 1);
        File.Delete(file);
        PeerConfig again = Assert.Single(UpConfig.Load(new[] { "up", "--config", path }, 1, running).Peers);
        Assert.True(again.PskKept);
        Assert.True(again.Psk.IsZero());
        File.WriteAllText(file, secret + "\n");
        File.SetUnixFileMode(file, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.OtherRead);
        Assert.Contains($": psk '{file}'", Assert.Throws<ConfigException>(() => UpConfig.Load(new[] { "up", "--config", path }, 1)).Message);
    }

    [Fact]
    public void ConfigFile_PeerIsolated()
    {
        string path = Write("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\n[[peer]]\npublic_key = \"PEERPUB\"\nisolated = true\n");
        Assert.True(Assert.Single(UpConfig.Load(new[] { "up", "--config", path }, 1).Peers).Isolated);
    }

    [Fact]
    public void ConfigFile_Missing_ClearError() =>
        Assert.Contains("no such file", Assert.Throws<ConfigException>(() => UpConfig.Load(new[] { "up", "--config", Path.Combine(_dir, "nope.toml") }, 1)).Message);

    // Every key the README lists as restart-only is one RestartKeysChanged notices, alone.
    [Theory]
    [InlineData("key", "--key OTHERKEY")]
    [InlineData("listen", "--listen 0.0.0.0:1")]
    [InlineData("address", "--address 100.64.0.9/24")]
    [InlineData("tun", "--tun other")]
    [InlineData("mtu", "--mtu 1300")]
    [InlineData("control", "--control /tmp/other.sock")]
    [InlineData("mgmt", "--mgmt 127.0.0.1:7778")]
    [InlineData("user", "--user nobody")]
    [InlineData("cipher", "--cipher aes-256-gcm")]
    [InlineData("mesh", "--mesh")]
    [InlineData("name", "--name other")]
    [InlineData("network", "--network 100.64.0.0/16")]
    [InlineData("workers", "--workers 2")]
    [InlineData("revocations", "--revocations /tmp/other.revoked")]
    public void RestartKeysChanged_EachRestartKey_Noticed(string key, string change)
    {
        string other = Path.Combine(_dir, "b.key");
        File.WriteAllText(other, TestNode.KeyFromSeed(5).ToBase64() + "\n");
        File.SetUnixFileMode(other, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        string[] baseArgs = ["up", "--key", _key, "--psk", _key, "--address", "100.64.0.1/24", "--network", "100.64.0.0/24", "--name", "self"];
        var changed = new List<string>(baseArgs);
        string[] c = change.Replace("OTHERKEY", other).Split(' ');
        int at = changed.IndexOf(c[0]);
        if (at > 0 && c.Length == 2) changed[at + 1] = c[1]; else changed.AddRange(c);
        UpConfig running = UpConfig.Load(baseArgs, 1), next = UpConfig.Load(changed.ToArray(), 1);
        Assert.Contains(key, UpConfig.RestartKeys);
        Assert.Equal(new[] { key }, running.RestartKeysChanged(next));
        Assert.Empty(running.RestartKeysChanged(UpConfig.Load(baseArgs, 1)));
    }

    // The network secrets are reloadable (a rotation): read again when their files change, and
    // only then (SecretsRead), so a reload with the files unchanged leaves the node's copies alone.
    [Fact]
    public void NetworkSecrets_Reloadable_ReadOnlyWhenTheirFilesChange()
    {
        string other = Path.Combine(_dir, "b.key");
        File.WriteAllText(other, TestNode.KeyFromSeed(5).ToBase64() + "\n");
        File.SetUnixFileMode(other, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        string[] baseArgs = ["up", "--key", _key, "--psk", _key, "--address", "100.64.0.1/24"];
        UpConfig running = UpConfig.Load(baseArgs, 1);
        Assert.True(running.SecretsRead);
        UpConfig same = UpConfig.Load(baseArgs, 1, running);
        Assert.False(same.SecretsRead);
        Assert.Empty(running.RestartKeysChanged(same));
        UpConfig rotated = UpConfig.Load([.. baseArgs, "--accept-psk", other], 1, running);
        Assert.True(rotated.SecretsRead);
        Assert.Empty(running.RestartKeysChanged(rotated));
        Assert.True(Assert.Single(rotated.AcceptPsks).EqualsCt(TestNode.KeyFromSeed(5)));
        UpConfig moved = UpConfig.Load(["up", "--key", _key, "--psk", other, "--accept-psk", _key, "--address", "100.64.0.1/24"], 1, rotated);
        Assert.True(moved.SecretsRead);
        Assert.True(moved.Psk.EqualsCt(TestNode.KeyFromSeed(5)));
        File.SetUnixFileMode(other, (UnixFileMode)0b110_100_000);
        var e = Assert.Throws<ConfigException>(() => UpConfig.Load([.. baseArgs, "--accept-psk", other], 1, running));
        Assert.Contains("accessible by group or others", e.Message);
    }

    [Fact]
    public void Admin_PublicKeyChecked_RevocationsBesideTheConfig()
    {
        byte[] pub = AdminSignature.PublicKeyOf(AdminSignature.NewPrivateKey())!;
        string cfg = Write($"key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\nadmin = \"{Convert.ToBase64String(pub)}\"\n");
        UpConfig c = UpConfig.Load(["up", "--config", cfg], 1);
        Assert.Equal(pub, c.AdminKey);
        Assert.Equal(Path.Combine(Path.GetDirectoryName(Path.GetFullPath(cfg))!, "revoked"), c.RevocationsPath);
        Assert.Null(UpConfig.Load(["up", "--key", _key, "--address", "100.64.0.1/24"], 1).RevocationsPath);   // flags only: kept in memory
        byte[] offCurve = (byte[])pub.Clone();
        offCurve[63] ^= 1;
        var e = Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--key", _key, "--address", "100.64.0.1/24", "--admin", Convert.ToBase64String(offCurve)], 1));
        Assert.Contains("is not an admin public key", e.Message);
        Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--key", _key, "--address", "100.64.0.1/24", "--admin", "c2hvcnQ="], 1));
    }

    [Fact]
    public void RestartKeys_ListAndReadmeAgree()
    {
        string readme = File.ReadAllText(Path.Combine(Vectors.Dir, "..", "..", "README.md"));
        Assert.Contains("a restart (" + string.Join(", ", UpConfig.RestartKeys[..^1]) + ",\n" + UpConfig.RestartKeys[^1] + ")", readme);
    }

    [Fact]
    public void RestartKeysChanged_OnlyNonReloadableKeysCount()
    {
        string a = Write("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\nlog_level = \"info\"\n");
        UpConfig c1 = UpConfig.Load(new[] { "up", "--config", a }, 1);
        string b = Write("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\nlog_level = \"debug\"\nkeepalive = 5\n");
        UpConfig c2 = UpConfig.Load(new[] { "up", "--config", b }, 1);
        Assert.Empty(c1.RestartKeysChanged(c2));
        string t = Write("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\ntun = \"other\"\nlisten = \"0.0.0.0:1\"\n");
        Assert.Equal(new[] { "listen", "tun" }, c1.RestartKeysChanged(UpConfig.Load(new[] { "up", "--config", t }, 1)));
        string w = Write("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\nworkers = 2\n");
        UpConfig cw = UpConfig.Load(new[] { "up", "--config", w }, 1);
        Assert.Equal(2, cw.Workers);
        Assert.Equal(new[] { "workers" }, c1.RestartKeysChanged(cw));
    }
}

public class ExampleConfigTests
{
    [Fact]
    public void ExampleFile_NamesEveryKeyAndParses()
    {
        string text = File.ReadAllText(Path.Combine(FindRepo(), "veil.toml.example"));
        TomlDoc doc = TomlDoc.Parse(text, "veil.toml.example");
        foreach (string key in new[] { "key", "listen", "address", "tun", "keepalive", "rekey_after", "control", "mgmt", "mgmt_acl",
                                       "max_sessions", "handshake_rate", "handshake_rate_per_source", "log_level", "log_format",
                                       "claim", "metric", "accept", "healthz_grace", "fec" })
            Assert.True(doc.Root.ContainsKey(key), key);
        foreach (string commented in new[] { "# psk = ", "# mtu = ", "# user = ", "# mesh = ", "# name = ", "# trust = ", "# network = ", "# workers = " }) Assert.Contains(commented, text);
        var peer = Assert.Single(doc.TableArrays["peer"]);
        foreach (string key in new[] { "name", "public_key", "endpoint", "allowed_ips", "keepalive" }) Assert.True(peer.ContainsKey(key), key);
    }

    private static string FindRepo()
    {
        string? d = AppContext.BaseDirectory;
        while (d != null && !File.Exists(Path.Combine(d, "Veil.csproj"))) d = Path.GetDirectoryName(d);
        return d ?? throw new DirectoryNotFoundException("Veil.csproj");
    }
}
