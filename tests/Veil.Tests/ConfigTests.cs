namespace Veil.Tests;

public sealed class ConfigTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("veil-cfg-").FullName;
    private readonly string _key, _peerPub;

    public ConfigTests()
    {
        _key = WriteKey("a.key", UnixFileMode.UserRead | UnixFileMode.UserWrite);
        Key32 other = TestNode.KeyFromSeed(8), pub = default;
        X25519.PublicKey(pub, other);
        _peerPub = pub.ToBase64();
    }

    public void Dispose() => Directory.Delete(_dir, true);

    private string WriteKey(string name, UnixFileMode mode, string? text = null)
    {
        string path = Path.Combine(_dir, name);
        Key32 k = TestNode.KeyFromSeed(4);
        File.WriteAllText(path, (text ?? k.ToBase64()) + "\n");
        File.SetUnixFileMode(path, mode);
        return path;
    }

    private UpConfig Parse(params string[] extra)
    {
        var args = new List<string> { "up", "--key", _key, "--address", "100.64.0.1/24" };
        args.AddRange(extra);
        return UpConfig.Load(args.ToArray(), 1);
    }

    [Fact]
    public void Flags_Full_Parsed()
    {
        UpConfig c = Parse("--listen", "[2001:db8::1]:4000", "--address", "fd00:64::1/64", "--tun", "veil7",
            "--peer", _peerPub + "@198.51.100.2:51820", "--allow", "100.64.0.2/32", "--allow=fd00:64::2/128",
            "--mtu", "1380", "--keepalive", "25", "--rekey-after", "3", "--control", "/tmp/x.sock", "--log-level", "debug");
        Assert.Equal(4000, c.ListenPort);
        Assert.Equal(2, c.Addresses.Count);
        Assert.Equal("veil7", c.TunName);
        Assert.Single(c.Peers);
        Assert.Equal("198.51.100.2:51820", c.Peers[0].Endpoint.ToString());
        Assert.Equal(new[] { "100.64.0.2/32", "fd00:64::2/128" }, c.Peers[0].Allowed.Select(p => p.ToString()));
        Assert.Equal(1380, c.Mtu);
        Assert.Equal(25_000, c.PersistentKeepaliveMs);
        Assert.Equal(3_000, c.RekeyAfterTimeMs);
        Assert.Equal(LogLevel.Debug, c.LogLevel);
    }

    [Fact]
    public void Defaults_ListenMtuTunControl()
    {
        UpConfig c = Parse("--peer", _peerPub);            // no endpoint: assume a 1500-byte IPv4 underlay
        Assert.Equal(51820, c.ListenPort);
        Assert.Equal("veil0", c.TunName);
        Assert.Equal(1420, c.Mtu);
        Assert.Equal("/var/run/veil.sock", c.ControlPath);
        Assert.Equal(1400, Parse("--listen", "[::]:51820", "--peer", _peerPub).Mtu);
        Assert.True(c.Fec);                                  // parity on lossy paths unless --fec off
        Assert.False(Parse("--peer", _peerPub, "--fec", "off").Fec);
        // derived from the route to the peer: loopback's 64 KiB is clamped to the largest MTU we take
        Assert.Equal(Tune.MaxMtu, Parse("--peer", _peerPub + "@127.0.0.1:51820").Mtu);
    }

    [Theory]
    [InlineData("unknown flag '--bogus'", "--bogus", "1")]
    [InlineData("--mtu '10' must be a whole number from 1280 to 9000", "--mtu", "10")]
    [InlineData("--log-level 'loud'", "--log-level", "loud")]
    [InlineData("--fec 'maybe' must be auto or off", "--fec", "maybe")]
    [InlineData("--listen '1.2.3.4:99999'", "--listen", "1.2.3.4:99999")]
    [InlineData("--listen 'nonsense'", "--listen", "nonsense")]
    [InlineData("--address '100.64.0.1/33'", "--address", "100.64.0.1/33")]
    [InlineData("--address '100.64.0.1'", "--address", "100.64.0.1")]
    [InlineData("--allow must follow the --peer", "--allow", "10.0.0.0/8")]
    [InlineData("--tun 'much-too-long-name'", "--tun", "much-too-long-name")]
    [InlineData("--tun 'a/b'", "--tun", "a/b")]
    [InlineData("--keepalive '-1'", "--keepalive", "-1")]
    [InlineData("--cipher 'des' must be auto, chacha20-poly1305 or aes-256-gcm", "--cipher", "des")]
    [InlineData("--peer 'notakey@1.2.3.4:5'", "--peer", "notakey@1.2.3.4:5")]
    public void BadFlag_OneClearError(string expect, string flag, string value)
    {
        var e = Assert.Throws<ConfigException>(() => Parse(flag, value));
        Assert.Contains(expect, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Theory]
    [InlineData("@host-without-port")]
    [InlineData("@[::1")]
    [InlineData("@2001:db8::1:51820")]       // IPv6 without brackets
    [InlineData("@198.51.100.2:0")]
    public void BadPeerEndpoint_Refused(string suffix)
    {
        var e = Assert.Throws<ConfigException>(() => Parse("--peer", _peerPub + suffix));
        Assert.Contains("--peer", e.Message);
    }

    [Fact]
    public void BadAllow_Refused() =>
        Assert.Contains("--allow 'foo'", Assert.Throws<ConfigException>(() => Parse("--peer", _peerPub, "--allow", "foo")).Message);

    [Fact]
    public void Mode_TapAndHub_WithMacLists()
    {
        Assert.Equal(L2Mode.Tun, Parse().Mode);
        UpConfig c = Parse("--mode", "tap", "--peer", _peerPub, "--allow-mac", "02:00:00:00:00:0A", "--allow-mac=02-00-00-00-00-0b");
        Assert.Equal(L2Mode.Tap, c.Mode);
        Assert.Equal(new[] { 0x02_00_00_00_00_0AUL, 0x02_00_00_00_00_0BUL }, c.Peers[0].AllowedMacs);
        Assert.Equal(1420 - Ethernet.MaxHeaderLen, c.Mtu);              // a frame's header fits the underlay too
        Assert.Equal(1380, Parse("--mode", "hub", "--mtu", "1380").Mtu);  // given: the TAP's own
        Assert.Equal(L2Mode.Hub, Parse("--mode", "hub").Mode);
        Assert.Contains("mode", Parse("--mode", "tap").RestartKeysChanged(Parse()));
        Assert.Equal("br-lan", Parse("--mode", "tap", "--bridge", "br-lan").Bridge);
        Assert.Contains("bridge", Parse("--mode", "tap", "--bridge", "br-lan").RestartKeysChanged(Parse("--mode", "tap")));
    }

    [Theory]
    [InlineData("--mode 'bridge' must be tun, tap or hub", "--mode", "bridge")]
    [InlineData("--allow-mac must follow the --peer", "--allow-mac", "02:00:00:00:00:01")]
    [InlineData("--allow-mac goes with --mode tap or hub", "--peer", "PEER", "--allow-mac", "02:00:00:00:00:01")]
    [InlineData("--allow-mac 'ff:ff:ff:ff:ff:ff' is not a unicast MAC", "--mode", "tap", "--peer", "PEER", "--allow-mac", "ff:ff:ff:ff:ff:ff")]
    [InlineData("--allow-mac '01:00:5e:00:00:01' is not a unicast MAC", "--mode", "tap", "--peer", "PEER", "--allow-mac", "01:00:5e:00:00:01")]
    [InlineData("--allow-mac '02:00:00:00:00' is not a unicast MAC", "--mode", "tap", "--peer", "PEER", "--allow-mac", "02:00:00:00:00")]
    [InlineData("--mode tap switches Ethernet frames: --claim", "--mode", "tap", "--claim", "10.9.0.0/24")]
    [InlineData("--mode hub switches Ethernet frames", "--mode", "hub", "--exit")]
    [InlineData("--bridge goes with --mode tap or hub", "--bridge", "br-lan")]
    [InlineData("--bridge veil0 is the TAP itself", "--mode", "tap", "--bridge", "veil0")]
    [InlineData("--bridge 'a-bridge-name-too-long' must be 1 to 15 characters", "--mode", "tap", "--bridge", "a-bridge-name-too-long")]
    public void Mode_BadCombinations_OneClearError(string expect, params string[] args)
    {
        var e = Assert.Throws<ConfigException>(() => Parse(args.Select(a => a == "PEER" ? _peerPub : a).ToArray()));
        Assert.Contains(expect, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void MissingValue_Refused() =>
        Assert.Contains("--tun needs a value", Assert.Throws<ConfigException>(() => Parse("--tun")).Message);

    [Fact]
    public void KeyFile_ReadableByOthers_Refused()
    {
        string loose = WriteKey("loose.key", UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.OtherRead);
        var e = Assert.Throws<ConfigException>(() => UpConfig.Load(new[] { "up", "--key", loose, "--address", "100.64.0.1/24" }, 1));
        Assert.Contains("chmod 600", e.Message);
        string group = WriteKey("group.key", UnixFileMode.UserRead | UnixFileMode.GroupRead);
        Assert.Throws<ConfigException>(() => UpConfig.Load(new[] { "up", "--key", group, "--address", "100.64.0.1/24" }, 1));
    }

    [Fact]
    public void KeyFile_MissingOrMalformed_Refused()
    {
        Assert.Contains("cannot read: no such file", Assert.Throws<ConfigException>(() =>
            UpConfig.Load(new[] { "up", "--key", Path.Combine(_dir, "nope"), "--address", "100.64.0.1/24" }, 1)).Message);
        string bad = WriteKey("bad.key", UnixFileMode.UserRead, "not base64!");
        Assert.Contains("base64 key of 32 bytes", Assert.Throws<ConfigException>(() =>
            UpConfig.Load(new[] { "up", "--key", bad, "--address", "100.64.0.1/24" }, 1)).Message);
        string shortKey = WriteKey("short.key", UnixFileMode.UserRead, "AAAA");
        Assert.Throws<ConfigException>(() => UpConfig.Load(new[] { "up", "--key", shortKey, "--address", "100.64.0.1/24" }, 1));
    }

    [Fact]
    public void Psk_SameRulesAsKey()
    {
        string loose = WriteKey("loose.psk", (UnixFileMode)0b110_100_100);
        Assert.Contains("--psk", Assert.Throws<ConfigException>(() => Parse("--psk", loose)).Message);
        string ok = WriteKey("ok.psk", UnixFileMode.UserRead | UnixFileMode.UserWrite);
        Assert.False(Parse("--psk", ok).Psk.IsZero());
    }

    [Fact]
    public void Exit_Flags_ClaimsAndRefusals()
    {
        UpConfig exit = Parse("--exit");
        Assert.True(exit.Exit);
        Mesh mesh = new Node(exit, new Log(TextWriter.Null, LogLevel.Error), new Counters()).Mesh;
        Assert.Contains(mesh.OwnClaims, c => c.Prefix.ToString() == "0.0.0.0/0");
        Assert.Contains(mesh.OwnClaims, c => c.Prefix.ToString() == "::/0");
        string peer = TestNet.PublicOf(TestNode.KeyFromSeed(9)).ToBase64() + "@192.0.2.9:51820";
        Assert.Contains("names no peer", Assert.Throws<ConfigException>(() => Parse("--peer", peer, "--allow", "100.64.0.9/32", "--exit-node", "gw")).Message);
        Assert.Contains("exclude each other", Assert.Throws<ConfigException>(() => Parse("--exit", "--exit-node", "gw")).Message);
        Assert.Contains("may hold only letters", Assert.Throws<ConfigException>(() => Parse("--exit-node", "g w")).Message);
        Assert.Equal(TestNet.PublicOf(TestNode.KeyFromSeed(9)).DefaultName(),
            Parse("--peer", peer, "--allow", "100.64.0.9/32", "--exit-node", TestNet.PublicOf(TestNode.KeyFromSeed(9)).DefaultName()).ExitNode);
    }

    // Every switch is a TOML boolean too (fix_rp_filter once wanted a string).
    [Fact]
    public void BoolKeys_TakeTomlBooleans()
    {
        foreach (string key in UpConfig.BoolKeys)
        {
            string file = Path.Combine(_dir, key + ".toml");
            string extra = key == "exit_allow_lan" ? "exit_node = \"gw\"\nmesh = true\npsk = \"" + _key + "\"\n" : key == "mesh" ? "psk = \"" + _key + "\"\n" : "";
            File.WriteAllText(file, $"key = \"{_key}\"\naddress = [\"100.64.0.1/24\"]\n{extra}{key} = true\n");
            UpConfig.Load(["up", "--config", file], 1);
            File.WriteAllText(file, $"key = \"{_key}\"\naddress = [\"100.64.0.1/24\"]\n{key} = \"yes\"\n");
            Assert.Contains("expected true or false", Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--config", file], 1)).Message);
        }
    }

    [Theory]
    [InlineData("100.64.0.0/24")]
    [InlineData("100.64.0.0/30")]
    [InlineData("10.0.0.0/8")]
    [InlineData("fd00:64::/64")]
    public void AutoAddress_StableInsideTheNetwork_NeverItsEnds(string network)
    {
        IpPrefix net = IpPrefix.Parse(network);
        var seen = new HashSet<string>();
        for (byte seed = 1; seed < 60; seed++)
        {
            Key32 key = TestNet.PublicOf(TestNode.KeyFromSeed(seed));
            IfAddress a = AutoAddress.Candidate(key, net, 0);
            Assert.Equal(a, AutoAddress.Candidate(key, net, 0));                 // the same for the same key
            Assert.Equal(net.Bits, a.Bits);
            byte[] b = a.Address.GetAddressBytes();
            Assert.True(net.Contains(b), $"{a} outside {net}");
            byte[] first = new byte[b.Length];
            net.WriteAddress(first);
            Assert.False(b.AsSpan().SequenceEqual(first), $"{a} is the network's own address");
            if (!net.IsV6)
            {
                uint mask = uint.MaxValue << (32 - net.Bits), v = System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(b);
                Assert.NotEqual(~mask, v & ~mask);                                  // not the broadcast address
            }
            seen.Add(a.ToString());
            IfAddress? next = AutoAddress.Next(key, net, x => x.Equals(a.Address));
            Assert.NotNull(next);
            Assert.NotEqual(a, next!.Value);
        }
        // keys spread over the network (a /30 has only two host addresses)
        Assert.True(seen.Count >= (net.Bits == 30 ? 2 : 40), $"{seen.Count} addresses for 59 keys");
    }

    [Fact]
    public void AutoAddress_ReloadKeepsTheRunningAddress_StateFileWins()
    {
        string state = Path.Combine(_dir, "state");
        string[] args = ["up", "--key", _key, "--psk", _key, "--mesh", "--network", "100.64.0.0/24", "--address", "auto", "--state", state];
        UpConfig first = UpConfig.Load(args, 1);
        Assert.Equal(AutoAddress.Candidate(first.PublicKey, IpPrefix.Parse("100.64.0.0/24"), 0), Assert.Single(first.Addresses));
        File.WriteAllText(state, $"{Node.StateHeader}\naddress 100.64.0.77/24\naddress 10.1.2.3/8\n");
        Assert.Equal("100.64.0.77/24", Assert.Single(UpConfig.Load(args, 1).Addresses).ToString());   // inside the network: taken
        Assert.Equal(first.Addresses, UpConfig.Load(args, 1, running: first).Addresses);                // a reload never moves it
        Assert.Contains("either auto or addresses", Assert.Throws<ConfigException>(() => UpConfig.Load([.. args, "--address", "100.64.0.9/24"], 1)).Message);
    }

    [Fact]
    public void RequiredAndDuplicates_Refused()
    {
        Assert.Contains("--key FILE is required", Assert.Throws<ConfigException>(() => UpConfig.Load(new[] { "up", "--address", "100.64.0.1/24" }, 1)).Message);
        Assert.Contains("--address CIDR is required", Assert.Throws<ConfigException>(() => UpConfig.Load(new[] { "up", "--key", _key }, 1)).Message);
        Assert.Contains("given twice", Assert.Throws<ConfigException>(() => Parse("--peer", _peerPub, "--peer", _peerPub)).Message);
        Key32 own = TestNode.KeyFromSeed(4), ownPub = default;
        X25519.PublicKey(ownPub, own);
        Assert.Contains("own public key", Assert.Throws<ConfigException>(() => Parse("--peer", ownPub.ToBase64())).Message);
    }

    // ---- mesh keys (§15) ----

    private string Psk() => WriteKey("mesh.psk", UnixFileMode.UserRead | UnixFileMode.UserWrite);

    private string WriteToml(string text)
    {
        string path = Path.Combine(_dir, "veil.toml");
        File.WriteAllText(path, text.Replace("KEYFILE", _key).Replace("PSKFILE", Psk()).Replace("PEERPUB", _peerPub));
        return path;
    }

    [Fact]
    public void Mesh_WithoutPsk_ErrorNamesMesh()
    {
        var e = Assert.Throws<ConfigException>(() => Parse("--mesh"));
        Assert.Contains("--mesh", e.Message);
        Assert.Contains("--psk", e.Message);
        Assert.DoesNotContain('\n', e.Message);
        // the file's mesh = true is held to the same rule
        string path = WriteToml("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\nmesh = true\n");
        Assert.Contains("--mesh", Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--config", path], 1)).Message);
    }

    [Fact]
    public void Mesh_DefaultKeepalive10s_ExplicitKeepaliveWins()
    {
        string psk = Psk();
        UpConfig c = Parse("--mesh", "--psk", psk);
        Assert.True(c.Mesh);
        Assert.Equal(Tune.MeshKeepaliveMs, c.PersistentKeepaliveMs);
        Assert.Equal(10_000, c.PersistentKeepaliveMs);
        Assert.Equal(25_000, Parse("--mesh", "--psk", psk, "--keepalive", "25").PersistentKeepaliveMs);
        Assert.Equal(0, Parse("--mesh", "--psk", psk, "--keepalive", "0").PersistentKeepaliveMs);
        Assert.Equal(0, Parse("--psk", psk).PersistentKeepaliveMs);              // without --mesh: off
        Assert.False(Parse("--psk", psk).Mesh);
        // liveness is 3 keepalive periods
        Assert.Equal(30_000, new Peer(0, new PeerConfig { PublicKey = c.PublicKey }, c.Psk, c.PersistentKeepaliveMs, 1420).LivenessMs);
    }

    [Fact]
    public void Mesh_KeysFromFlags_Parsed()
    {
        UpConfig c = Parse("--mesh", "--psk", Psk(), "--name", "gw-1.site_a", "--claim", "10.1.0.0/16", "--claim", "fd10::/48",
            "--accept", "0.0.0.0/0", "--network", "100.64.0.0/16", "--metric", "7", "--trust", _peerPub);
        Assert.Equal("gw-1.site_a", c.Name);
        Assert.Equal(new[] { "10.1.0.0/16", "fd10::/48" }, c.Claims.Select(p => p.ToString()));
        Assert.Equal("0.0.0.0/0", Assert.Single(c.Accept).ToString());
        Assert.Equal("100.64.0.0/16", Assert.Single(c.Networks).ToString());     // given: not derived
        Assert.Equal(7, c.Metric);
        PeerConfig t = Assert.Single(c.Peers);
        Assert.True(t.Trusted);
        Assert.Equal(_peerPub, t.PublicKey.ToBase64());
        Assert.False(t.Endpoint.IsSet);
        Assert.Equal("", t.EndpointText);
        Assert.Empty(t.Allowed);
    }

    [Fact]
    public void Mesh_Defaults_NetworksFromAddresses_Metric100_NoClaimsNoAccept()
    {
        UpConfig c = Parse("--address", "fd00:64::1/64");
        Assert.Equal(new[] { "100.64.0.0/24", "fd00:64::/64" }, c.Networks.Select(p => p.ToString()));
        Assert.Equal(Tune.DefaultMetric, c.Metric);
        Assert.Empty(c.Claims);
        Assert.Empty(c.Accept);
        Assert.False(c.Mesh);
        Assert.Equal("", c.Name);
    }

    [Theory]
    [InlineData("--claim", "10.0.0.0/33")]
    [InlineData("--claim", "nonsense")]
    [InlineData("--accept", "0.0.0.0/")]
    [InlineData("--accept", "::/129")]
    [InlineData("--network", "100.64.0.0/-1")]
    [InlineData("--metric", "65536")]
    [InlineData("--metric", "-1")]
    [InlineData("--metric", "ten")]
    [InlineData("--name", "has space")]
    [InlineData("--name", "thirty-three-characters-long-name")]
    public void Mesh_BadFlag_OneClearErrorNamingIt(string flag, string value)
    {
        var e = Assert.Throws<ConfigException>(() => Parse(flag, value));
        Assert.Contains(flag, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void Workers_ZeroMeansAuto_RangeChecked()
    {
        Assert.Equal(0, Parse().Workers);
        Assert.Equal(3, Parse("--workers", "3").Workers);
        Assert.Equal(Tune.MaxWorkers, Parse("--workers", "16").Workers);
        foreach (string bad in new[] { "17", "-1", "two", "" })
        {
            var e = Assert.Throws<ConfigException>(() => Parse("--workers", bad));
            Assert.Contains("--workers", e.Message);
        }
        Assert.Equal(1, Tune.AutoWorkers(1));
        Assert.Equal(1, Tune.AutoWorkers(2));
        Assert.Equal(4, Tune.AutoWorkers(4));
        Assert.Equal(Tune.AutoMaxWorkers, Tune.AutoWorkers(64));
    }

    [Fact]
    public void Mesh_BadCidr_ErrorQuotesValue()
    {
        Assert.Contains("--claim '10.0.0.0/33' is not a CIDR prefix", Assert.Throws<ConfigException>(() => Parse("--claim", "10.0.0.0/33")).Message);
        Assert.Contains("--accept 'x' is not a CIDR prefix", Assert.Throws<ConfigException>(() => Parse("--accept", "x")).Message);
        Assert.Contains("--network 'x/8' is not a CIDR prefix", Assert.Throws<ConfigException>(() => Parse("--network", "x/8")).Message);
        Assert.Contains("--metric '65536' must be a whole number from 0 to 65535", Assert.Throws<ConfigException>(() => Parse("--metric", "65536")).Message);
        Assert.Equal(0, Parse("--metric", "0").Metric);
        Assert.Equal(65535, Parse("--metric", "65535").Metric);
    }

    [Theory]
    [InlineData("@198.51.100.2:51820")]
    [InlineData("@[2001:db8::1]:51820")]
    [InlineData("@host.example:51820")]
    public void Trust_WithEndpoint_Refused(string suffix)
    {
        var e = Assert.Throws<ConfigException>(() => Parse("--trust", _peerPub + suffix));
        Assert.Contains("--trust", e.Message);
        Assert.Contains("public key alone", e.Message);
    }

    [Fact]
    public void Trust_NotAKey_Refused() =>
        Assert.Contains("--trust 'AAAA'", Assert.Throws<ConfigException>(() => Parse("--trust", "AAAA")).Message);

    [Fact]
    public void Claims_OverTheBound_Refused()
    {
        var args = new List<string>();
        for (int i = 0; i < Tune.MaxClaimsPerMember; i++) { args.Add("--claim"); args.Add($"10.{i}.0.0/16"); }
        var e = Assert.Throws<ConfigException>(() => Parse(args.ToArray()));        // 32 claims + 1 address
        Assert.Contains($"at most {Tune.MaxClaimsPerMember - 1} --claim", e.Message);
        Assert.Equal(Tune.MaxClaimsPerMember - 1, Parse(args.Take(2 * (Tune.MaxClaimsPerMember - 1)).ToArray()).Claims.Count);
    }

    [Fact]
    public void MeshFile_Parsed()
    {
        Key32 t2 = TestNet.PublicOf(TestNode.KeyFromSeed(11));
        string path = WriteToml($"""
            key = "KEYFILE"
            psk = "PSKFILE"
            address = ["100.64.0.1/24", "fd00:64::1/64"]
            mesh = true
            name = "router-1"
            claim = ["192.168.10.0/24", "fd10::/48"]
            accept = ["0.0.0.0/0", "10.0.0.0/8"]
            network = ["100.64.0.0/16"]
            metric = 20
            trust = ["PEERPUB", "{t2.ToBase64()}"]
            """);
        UpConfig c = UpConfig.Load(["up", "--config", path], 1);
        Assert.True(c.Mesh);
        Assert.Equal("router-1", c.Name);
        Assert.Equal(new[] { "192.168.10.0/24", "fd10::/48" }, c.Claims.Select(p => p.ToString()));
        Assert.Equal(new[] { "0.0.0.0/0", "10.0.0.0/8" }, c.Accept.Select(p => p.ToString()));
        Assert.Equal("100.64.0.0/16", Assert.Single(c.Networks).ToString());
        Assert.Equal(20, c.Metric);
        Assert.Equal(10_000, c.PersistentKeepaliveMs);
        Assert.Equal(2, c.Peers.Count);
        Assert.All(c.Peers, p => Assert.True(p.Trusted && !p.Endpoint.IsSet));
        Assert.Equal(new[] { _peerPub, t2.ToBase64() }, c.Peers.Select(p => p.PublicKey.ToBase64()));
    }

    [Fact]
    public void MeshFile_FlagsReplaceTheFilesLists()
    {
        Key32 t2 = TestNet.PublicOf(TestNode.KeyFromSeed(11));
        string path = WriteToml("""
            key = "KEYFILE"
            psk = "PSKFILE"
            address = ["100.64.0.1/24"]
            mesh = true
            claim = ["192.168.10.0/24", "192.168.11.0/24"]
            accept = ["0.0.0.0/0"]
            network = ["100.64.0.0/16"]
            trust = ["PEERPUB"]
            metric = 20
            name = "fromfile"
            """);
        UpConfig c = UpConfig.Load(["up", "--config", path, "--claim", "10.9.0.0/16", "--accept", "10.0.0.0/8", "--network", "100.64.0.0/24",
                                    "--trust", t2.ToBase64(), "--metric", "5", "--name", "fromflag"], 1);
        Assert.Equal("10.9.0.0/16", Assert.Single(c.Claims).ToString());
        Assert.Equal("10.0.0.0/8", Assert.Single(c.Accept).ToString());
        Assert.Equal("100.64.0.0/24", Assert.Single(c.Networks).ToString());
        Assert.Equal(t2.ToBase64(), Assert.Single(c.Peers).PublicKey.ToBase64());
        Assert.Equal(5, c.Metric);
        Assert.Equal("fromflag", c.Name);
        // without the flags the file's lists stand
        UpConfig f = UpConfig.Load(["up", "--config", path], 1);
        Assert.Equal(2, f.Claims.Count);
        Assert.Equal(_peerPub, Assert.Single(f.Peers).PublicKey.ToBase64());
    }

    [Theory]
    [InlineData("mesh = \"yes\"", "veil.toml:3: key 'mesh': expected true or false")]
    [InlineData("claim = \"10.0.0.0/8\"", "veil.toml:3: key 'claim': expected an array of strings")]
    [InlineData("claim = [\"10.0.0.0/33\"]", "veil.toml:3: key 'claim': '10.0.0.0/33' is not a CIDR prefix")]
    [InlineData("accept = [\"junk\"]", "veil.toml:3: key 'accept': 'junk' is not a CIDR prefix")]
    [InlineData("network = [\"100.64.0.0/99\"]", "veil.toml:3: key 'network': '100.64.0.0/99' is not a CIDR prefix")]
    [InlineData("metric = 70000", "veil.toml:3: key 'metric': '70000' must be a whole number from 0 to 65535")]
    [InlineData("metric = \"5\"", "veil.toml:3: key 'metric': expected an integer")]
    [InlineData("name = \"a b\"", "veil.toml:3: key 'name': 'a b' may hold only")]
    [InlineData("trust = [\"PEERPUB@198.51.100.2:51820\"]", "veil.toml:3: key 'trust':")]
    public void MeshFile_BadValues_NameFileLineAndKey(string line, string expect)
    {
        string path = WriteToml("key = \"KEYFILE\"\naddress = [\"100.64.0.1/24\"]\n" + line + "\n");
        var e = Assert.Throws<ConfigException>(() => UpConfig.Load(["up", "--config", path], 1));
        Assert.StartsWith(expect, e.Message);
    }

    [Fact]
    public void IpPrefix_MasksHostBitsAndRejectsJunk()
    {
        Assert.Equal("10.0.0.0/8", IpPrefix.Parse("10.1.2.3/8").ToString());
        Assert.Equal("fd00::/8", IpPrefix.Parse("fd12:3456::1/8").ToString());
        foreach (string bad in new[] { "", "/", "10.0.0.0/", "10.0.0.0/-1", "10.0.0.0/+8", "fe80::1%eth0/64", "::/129", "host/8" })
            Assert.False(IpPrefix.TryParse(bad, out _), bad);
    }
}

public class EndpointNameTests
{
    [Fact]
    public void PeerName_NotResolvableYet_KeptForLater()
    {
        string dir = Directory.CreateTempSubdirectory("veil-dns-").FullName;
        try
        {
            string key = Path.Combine(dir, "a.key");
            File.WriteAllText(key, TestNode.KeyFromSeed(4).ToBase64());
            File.SetUnixFileMode(key, UnixFileMode.UserRead | UnixFileMode.UserWrite);
            Key32 pub = default, priv = TestNode.KeyFromSeed(8);
            X25519.PublicKey(pub, priv);
            UpConfig c = UpConfig.Load(new[] { "up", "--key", key, "--address", "100.64.0.1/24", "--peer", pub.ToBase64() + "@gateway.invalid:51820" }, 1);
            Assert.False(c.Peers[0].Endpoint.IsSet);
            Assert.Equal("gateway.invalid:51820", c.Peers[0].EndpointText);
            Assert.Throws<ConfigException>(() => UpConfig.Load(new[] { "up", "--key", key, "--address", "100.64.0.1/24", "--peer", pub.ToBase64() + "@bad_name!:51820" }, 1));
        }
        finally { Directory.Delete(dir, true); }
    }
}
