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
        // derived from the route to the peer: loopback's 64 KiB is clamped to the largest MTU we take
        Assert.Equal(Tune.MaxMtu, Parse("--peer", _peerPub + "@127.0.0.1:51820").Mtu);
    }

    [Theory]
    [InlineData("unknown flag '--bogus'", "--bogus", "1")]
    [InlineData("--mtu '10' must be a whole number from 1280 to 9000", "--mtu", "10")]
    [InlineData("--log-level 'loud'", "--log-level", "loud")]
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
    public void RequiredAndDuplicates_Refused()
    {
        Assert.Contains("--key FILE is required", Assert.Throws<ConfigException>(() => UpConfig.Load(new[] { "up", "--address", "100.64.0.1/24" }, 1)).Message);
        Assert.Contains("--address CIDR is required", Assert.Throws<ConfigException>(() => UpConfig.Load(new[] { "up", "--key", _key }, 1)).Message);
        Assert.Contains("given twice", Assert.Throws<ConfigException>(() => Parse("--peer", _peerPub, "--peer", _peerPub)).Message);
        Key32 own = TestNode.KeyFromSeed(4), ownPub = default;
        X25519.PublicKey(ownPub, own);
        Assert.Contains("own public key", Assert.Throws<ConfigException>(() => Parse("--peer", ownPub.ToBase64())).Message);
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
