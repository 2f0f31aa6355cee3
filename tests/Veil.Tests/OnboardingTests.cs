using System.Buffers.Binary;
using System.Net;
using System.Text;

namespace Veil.Tests;

public sealed class OnboardingTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("veil-onb-").FullName;
    private readonly Key32 _inviterPriv = TestNode.KeyFromSeed(30), _inviterPub;
    private readonly Log _log = new(TextWriter.Null, LogLevel.Error);

    public OnboardingTests() => X25519.PublicKey(_inviterPub, _inviterPriv);
    public void Dispose() => Directory.Delete(_dir, true);

    private readonly List<PeerConfig> _persisted = new();

    private (Invites Invites, InviteToken Token, List<PeerConfig> Persisted) NewInvite(long expiresIn = 3600)
    {
        var inv = new Invites(_inviterPriv) { Psk = TestNode.KeyFromSeed(31) };
        InviteToken t = inv.Create(_inviterPub, "192.0.2.1:51820", "lab", new IfAddress(IPAddress.Parse("100.64.0.1"), 24),
            new IfAddress(IPAddress.Parse("100.64.0.5"), 24), "bee", DateTimeOffset.UtcNow.ToUnixTimeSeconds() + expiresIn);
        return (inv, t, _persisted);
    }

    [Theory]
    [InlineData("a b")]
    [InlineData("abcdefghijklmnopqrstuvwxyz0123456")]       // 33 characters: past what a config name takes
    public void Create_NameTheConfigWouldRefuse_Refused(string name)
    {
        var inv = new Invites(_inviterPriv);
        var e = Assert.Throws<ConfigException>(() => inv.Create(_inviterPub, "192.0.2.1:51820", "lab", new IfAddress(IPAddress.Parse("100.64.0.1"), 24),
            new IfAddress(IPAddress.Parse("100.64.0.5"), 24), name, DateTimeOffset.UtcNow.ToUnixTimeSeconds() + 60));
        Assert.Contains("1 to 32 letters", e.Message);
    }

    // What the daemon does with a JoinHello: Consume, then write each queued joiner down (here: a
    // list) and answer it with what Written returns.
    private byte[]? Join(Invites inv, byte[] hello, Endpoint from)
    {
        byte[]? reply = inv.Consume(hello, _log, from);
        while (inv.Joiners.TryDequeue(out Invites.Joiner? j))
        {
            _persisted.Add(j.Peer);
            reply = inv.Written(j, "", _log);
        }
        return reply;
    }

    internal static byte[] JoinHello(InviteToken t, in Key32 joinerPub, ReadOnlySpan<byte> secret, string name = "bee")
    {
        byte[] body = t.Body(withSecret: false);
        byte[] nameBytes = Encoding.UTF8.GetBytes(name);
        byte[] hello = new byte[8 + body.Length + 16 + 32 + 16 + 1 + nameBytes.Length];
        Wire.WritePreamble(hello, Spec.TlsHandshake, hello.Length);
        hello[5] = Invites.TypeJoinHello;
        BinaryPrimitives.WriteUInt16BigEndian(hello.AsSpan(6), (ushort)(body.Length + 16));
        body.CopyTo(hello, 8);
        t.Tag.CopyTo(hello, 8 + body.Length);
        int at = 8 + body.Length + 16;
        ((ReadOnlySpan<byte>)joinerPub).CopyTo(hello.AsSpan(at));
        InviteToken.JoinProof(secret, t.Id, joinerPub, hello.AsSpan(at + 32, 16));
        hello[at + 48] = (byte)nameBytes.Length;
        nameBytes.CopyTo(hello, at + 49);
        return hello;
    }

    private static Key32 Pub(byte seed)
    {
        Key32 priv = TestNode.KeyFromSeed(seed), pub = default;
        X25519.PublicKey(pub, priv);
        return pub;
    }

    [Theory]
    [InlineData("bee", "laptop", "bee")]          // the inviter's --name wins over the joiner's hostname
    [InlineData("", "laptop", "laptop")]          // no name in the invite: the joiner's
    [InlineData("", "my host", "")]               // one the config would refuse: the key's default name
    public void Join_TheInvitesNameWins(string invited, string asked, string expect)
    {
        var inv = new Invites(_inviterPriv) { Psk = TestNode.KeyFromSeed(31) };
        InviteToken t = inv.Create(_inviterPub, "192.0.2.1:51820", "lab", new IfAddress(IPAddress.Parse("100.64.0.1"), 24),
            new IfAddress(IPAddress.Parse("100.64.0.5"), 24), invited, DateTimeOffset.UtcNow.ToUnixTimeSeconds() + 60);
        Assert.NotNull(Join(inv, JoinHello(t, Pub(40), t.Secret, asked), TestNet.Ep(1)));
        Assert.Equal(expect, Assert.Single(_persisted).Name);
    }

    [Fact]
    public void ListAndRevoke_APendingInvite_NotAUsedOne()
    {
        var (inv, t, _) = NewInvite();
        long now = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        Assert.Matches($"^{t.Id:x16}  100\\.64\\.0\\.5/24 +bee +pending  expires in (1 h 0 min|59 min [0-9]+ s)\n$", inv.List(now));
        Assert.StartsWith("error: no invite 12", inv.Revoke("12"));
        Assert.Equal($"ok: invite {t.Id:x16} revoked\n", inv.Revoke($"{t.Id:x16}"));
        Assert.Equal("no pending invites\n", inv.List(now));
        Assert.Null(Join(inv, JoinHello(t, Pub(40), t.Secret), TestNet.Ep(1)));      // the token is dead
        Assert.Empty(inv.ReservedAddresses());                                      // and its address free
        var (inv2, t2, _) = NewInvite();
        Assert.NotNull(Join(inv2, JoinHello(t2, Pub(41), t2.Secret), TestNet.Ep(1)));
        Assert.Contains("  joined  ", inv2.List(now));
        Assert.StartsWith($"error: invite {t2.Id:x16} was used already", inv2.Revoke($"{t2.Id:x16}"));
    }

    // veil invite --isolated: the joiner is written down isolated, and the mark survives a restart
    // of the inviter between the invite and the join.
    [Fact]
    public void Invite_Isolated_JoinerWrittenDownIsolated_AcrossARestart()
    {
        var inv = new Invites(_inviterPriv) { Psk = TestNode.KeyFromSeed(31) };
        long now = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        InviteToken t = inv.Create(_inviterPub, "192.0.2.1:51820", "lab", new IfAddress(IPAddress.Parse("100.64.0.1"), 24),
            new IfAddress(IPAddress.Parse("100.64.0.5"), 24), "guest", now + 60, isolated: true);
        string text = inv.Snapshot(now);
        Assert.EndsWith(" guest - isolated\n", text);
        Assert.Contains("  pending  isolated  expires", inv.List(now));
        var restarted = new Invites(_inviterPriv) { Psk = TestNode.KeyFromSeed(31) };
        Assert.Null(restarted.Load(text, now, out int restored));
        Assert.Equal(1, restored);
        Assert.NotNull(Join(restarted, JoinHello(t, Pub(40), t.Secret), TestNet.Ep(1)));
        Assert.True(Assert.Single(_persisted).Isolated);
        Assert.Contains("isolated = true\n", Onboarding.PeerToml(_persisted[0]));
        // its own secret, not the network's: with that it could come back under another key
        Assert.False(_persisted[0].Psk.IsZero());
        Assert.False(_persisted[0].Psk.EqualsCt(TestNode.KeyFromSeed(31)));
        Assert.Contains($"psk = \"peer-{t.Id:x16}.psk\"\n", Onboarding.PeerToml(_persisted[0]));
        Assert.Equal("guest", _persisted[0].Name);                          // the invite's name
        Assert.True(_persisted[0].NameGiven);
        Assert.StartsWith("line 2 ", restarted.Load(Invites.FileHeader + text.Split('\n')[1].Replace(" isolated", " isolatedd") + "\n", now, out _));
    }

    // The invites file: what a restart reads back is what was pending, and a joiner written down
    // before the restart still gets its JoinAccept (its retransmits arrive after the restart).
    [Fact]
    public void Invites_SnapshotLoad_SurviveARestart()
    {
        var (inv, pending, _) = NewInvite();
        InviteToken used = inv.Create(_inviterPub, "192.0.2.1:51820", "lab", new IfAddress(IPAddress.Parse("100.64.0.1"), 24),
            new IfAddress(IPAddress.Parse("100.64.0.6"), 24), "", DateTimeOffset.UtcNow.ToUnixTimeSeconds() + 600);
        byte[] accept = Join(inv, JoinHello(used, Pub(40), used.Secret), TestNet.Ep(1))!;
        long now = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        string text = inv.Snapshot(now);
        Assert.StartsWith(Invites.FileHeader, text);
        Assert.Equal(2, text.Split('\n').Count(l => l.StartsWith("invite veil1-")));
        Assert.Contains($" - {Pub(40).ToBase64()}\n", text);          // the used one: no name, its joiner's key

        var restarted = new Invites(_inviterPriv) { Psk = TestNode.KeyFromSeed(31) };
        Assert.Null(restarted.Load(text, now, out int restored));
        Assert.Equal(2, restored);
        Assert.Equal(inv.List(now), restarted.List(now));
        Assert.Equal(text, restarted.Snapshot(now));
        Assert.Equal(accept, Join(restarted, JoinHello(used, Pub(40), used.Secret), TestNet.Ep(1)));   // a retransmit
        Assert.Null(Join(restarted, JoinHello(used, Pub(41), used.Secret), TestNet.Ep(2)));           // still used
        Assert.NotNull(Join(restarted, JoinHello(pending, Pub(42), pending.Secret), TestNet.Ep(3)));  // still pending
        Assert.Equal(["100.64.0.5/32"], _persisted.Skip(1).Select(p => p.Allowed[0].ToString()));
        // expired ones are not read back
        var later = new Invites(_inviterPriv);
        Assert.Null(later.Load(text, now + 4000, out restored));
        Assert.Equal(0, restored);
    }

    [Theory]
    [InlineData("invite veil1-AAAA - -")]                                  // not a token
    [InlineData("invite TOKEN")]                                           // fields missing
    [InlineData("invite TOKEN bad/name -")]
    [InlineData("invite TOKEN - not-a-key")]
    [InlineData("pending TOKEN - -")]
    public void Invites_LoadBadLine_NothingUsed(string line)
    {
        var (inv, t, _) = NewInvite();
        long now = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        string good = inv.Snapshot(now);
        var restarted = new Invites(_inviterPriv);
        Assert.StartsWith("line 3 ", restarted.Load(good + line.Replace("TOKEN", t.Encode()) + "\n", now, out int restored));
        Assert.Equal(0, restored);
        Assert.Equal("no pending invites\n", restarted.List(now));
    }

    [Fact]
    public void Invites_LoadAnotherKeysTokens_Refused()
    {
        var (inv, _, _) = NewInvite();
        long now = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        var other = new Invites(TestNode.KeyFromSeed(32));
        Assert.Equal("line 2 holds an invite this node's key did not make", other.Load(inv.Snapshot(now), now, out _));
        Assert.Equal("no pending invites\n", other.List(now));
    }

    [Theory]
    [InlineData("hq", "lab", "hq")]                         // the inviter's name
    [InlineData("", "lab", "lab-inviter")]                  // none in the token
    [InlineData("bad name", "lab", "lab-inviter")]          // one the joiner's config would refuse
    public void Token_CarriesTheInvitersName(string inviterName, string network, string expect)
    {
        var inv = new Invites(_inviterPriv);
        InviteToken t = inv.Create(_inviterPub, "192.0.2.1:51820", network, new IfAddress(IPAddress.Parse("100.64.0.1"), 24),
            new IfAddress(IPAddress.Parse("100.64.0.5"), 24), "", DateTimeOffset.UtcNow.ToUnixTimeSeconds() + 60, inviterName);
        Assert.Equal(expect, InviteToken.Parse(t.Encode())!.InviterPeerName());
    }

    [Theory]
    [InlineData("my host.lan", "my-host.lan")]
    [InlineData("router_1", "router_1")]
    [InlineData("a-very-long-hostname-of-a-router-in-a-rack", "a-very-long-hostname-of-a-router")]
    public void MendName_HostnameMadeAName(string host, string expect) => Assert.Equal(expect, UpConfig.MendName(host));

    [Fact]
    public void InviteEndpoint_Guessed_MappedThenObservedThenOwnIPv4()
    {
        var m = TestNet.FullMesh(1).Nodes[0].Node.Mesh;
        m.LocalEndpoints.Clear();
        Assert.Null(Daemon.GuessEndpoint(m));
        Endpoint own6 = Endpoint.FromIp(IPAddress.Parse("2001:db8::5"), 51820), own4 = Endpoint.FromIp(IPAddress.Parse("192.0.2.5"), 51820);
        m.LocalEndpoints.Add(own6);
        Assert.Equal(own6, Daemon.GuessEndpoint(m));
        m.LocalEndpoints.Add(own4);
        Assert.Equal(own4, Daemon.GuessEndpoint(m));
        Endpoint seen = Endpoint.FromIp(IPAddress.Parse("203.0.113.7"), 40001);
        m.Observed.Add(seen);
        Assert.Equal(seen, Daemon.GuessEndpoint(m));
        m.Mapped = Endpoint.FromIp(IPAddress.Parse("203.0.113.7"), 51820);
        Assert.Equal(m.Mapped, Daemon.GuessEndpoint(m));
    }

    [Fact]
    public void Token_EncodeParse_RoundTrip()
    {
        var (_, t, _) = NewInvite();
        string text = t.Encode();
        Assert.StartsWith("veil1-", text);
        InviteToken back = InviteToken.Parse(text)!;
        Assert.Equal(t.Id, back.Id);
        Assert.Equal("192.0.2.1:51820", back.Endpoint);
        Assert.Equal("lab", back.NetworkName);
        Assert.Equal("100.64.0.5/24", back.JoinerAddress.ToString());
        Assert.Equal("100.64.0.0/24", back.Network.ToString());
        Assert.True(back.Secret.EqualsCt(t.Secret));
        Assert.Equal(t.Tag, back.Tag);
    }

    [Fact]
    public void Token_GarbageAndTruncation_NullNeverThrows()
    {
        var (_, t, _) = NewInvite();
        string text = t.Encode();
        for (int n = 0; n < text.Length; n++) Assert.Null(InviteToken.Parse(text[..n]));
        Assert.Null(InviteToken.Parse("veil1-!!!"));
        Assert.Null(InviteToken.Parse("hello"));
    }

    [Fact]
    public void Join_Valid_PersistsOnceAndSealsPskToTheJoiner()
    {
        var (inv, t, persisted) = NewInvite();
        Key32 joiner = Pub(40);
        byte[]? reply = Join(inv, JoinHello(t, joiner, t.Secret), TestNet.Ep(1));
        Assert.NotNull(reply);
        PeerConfig pc = Assert.Single(persisted);
        Assert.True(pc.PublicKey.EqualsCt(joiner));
        Assert.Equal("100.64.0.5/32", Assert.Single(pc.Allowed).ToString());
        // the joiner's retransmit gets the same answer; nothing is persisted twice
        Assert.NotNull(Join(inv, JoinHello(t, joiner, t.Secret), TestNet.Ep(1)));
        Assert.Single(persisted);
        // a second joiner with the same token is refused
        Assert.Null(Join(inv, JoinHello(t, Pub(41), t.Secret), TestNet.Ep(2)));
        Assert.Single(persisted);
    }

    // The packet path only queues a joiner; the answer waits until the daemon wrote it down (the
    // file is synced off the node's lock). Meanwhile the invite is that key's: a retransmit waits
    // quietly, another key is refused; a failed write frees the invite again.
    [Fact]
    public void Join_AnsweredOnlyOnceWrittenDown_AndFreedWhenTheWriteFails()
    {
        var (inv, t, _) = NewInvite();
        Key32 joiner = Pub(40);
        Assert.Empty(inv.Consume(JoinHello(t, joiner, t.Secret), _log, TestNet.Ep(1))!);
        Invites.Joiner j = Assert.Single(inv.Joiners);
        Assert.True(j.Peer.PublicKey.EqualsCt(joiner));
        Assert.Equal(TestNet.Ep(1), j.From);
        Assert.Empty(inv.Consume(JoinHello(t, joiner, t.Secret), _log, TestNet.Ep(1))!);   // retransmit: still waiting
        Assert.Single(inv.Joiners);                                                               // not queued twice
        Assert.Null(inv.Consume(JoinHello(t, Pub(41), t.Secret), _log, TestNet.Ep(2)));           // another key: already used
        inv.Joiners.Dequeue();

        Assert.Null(inv.Written(j, "disk full", _log));                                           // the write failed
        Assert.Empty(inv.Consume(JoinHello(t, Pub(41), t.Secret), _log, TestNet.Ep(2))!); // the invite is free again
        Invites.Joiner second = inv.Joiners.Dequeue();
        Assert.Null(inv.Written(j, "", _log));                                                    // a stale completion changes nothing
        byte[]? accept = inv.Written(second, "", _log);
        Assert.NotNull(accept);
        Assert.Equal(Invites.TypeJoinAccept, accept[5]);
        Assert.Equal(accept, inv.Consume(JoinHello(t, Pub(41), t.Secret), _log, TestNet.Ep(2)));  // a retransmit: the same answer
        Assert.Empty(inv.Joiners);
    }

    [Fact]
    public void Join_AlteredFieldOrWrongSecret_Refused()
    {
        var (inv, t, persisted) = NewInvite();
        var altered = InviteToken.Parse(t.Encode())!;
        altered.JoinerAddress = new IfAddress(IPAddress.Parse("100.64.0.200"), 24);     // try to pick another address
        Assert.Null(Join(inv, JoinHello(altered, Pub(40), t.Secret), TestNet.Ep(1)));
        var later = InviteToken.Parse(t.Encode())!;
        later.ExpiresUnix += 86400;                                                        // try to extend it
        Assert.Null(Join(inv, JoinHello(later, Pub(40), t.Secret), TestNet.Ep(1)));
        Key32 wrong = TestNode.KeyFromSeed(99);
        Assert.Null(Join(inv, JoinHello(t, Pub(40), wrong), TestNet.Ep(1)));       // proof without the secret
        Assert.Empty(persisted);
        Assert.NotNull(Join(inv, JoinHello(t, Pub(40), t.Secret), TestNet.Ep(1)));  // the real one still works
    }

    [Fact]
    public void Join_TokenOfAnotherInviter_Refused()
    {
        var (inv, _, persisted) = NewInvite();
        var other = new Invites(TestNode.KeyFromSeed(77));
        InviteToken foreign = other.Create(_inviterPub, "192.0.2.1:51820", "lab", new IfAddress(IPAddress.Parse("100.64.0.1"), 24),
            new IfAddress(IPAddress.Parse("100.64.0.5"), 24), "x", DateTimeOffset.UtcNow.ToUnixTimeSeconds() + 60);
        Assert.Null(Join(inv, JoinHello(foreign, Pub(40), foreign.Secret), TestNet.Ep(1)));
        Assert.Empty(persisted);
    }

    [Fact]
    public void Join_Expired_Refused()
    {
        var (inv, t, persisted) = NewInvite(expiresIn: -1);
        Assert.Null(Join(inv, JoinHello(t, Pub(40), t.Secret), TestNet.Ep(1)));
        Assert.Empty(persisted);
    }

    [Fact]
    public void Join_RandomBytes_NeverThrow()
    {
        var (inv, _, persisted) = NewInvite();
        var rng = new Random(5);
        for (int i = 0; i < 2000; i++)
        {
            byte[] d = new byte[rng.Next(0, 400)];
            rng.NextBytes(d);
            if (d.Length > 8) { d[5] = Invites.TypeJoinHello; BinaryPrimitives.WriteUInt16BigEndian(d.AsSpan(6), (ushort)rng.Next(0, d.Length)); }
            Assert.Null(Join(inv, d, TestNet.Ep(1)));
        }
        Assert.Empty(persisted);
    }

    [Fact]
    public void Init_WritesKeyAndConfig_NeverOverwrites()
    {
        string dir = Path.Combine(_dir, "n");
        Assert.Equal(0, OnboardingCli.Init(new[] { "init", "--dir", dir, "--address", "100.64.0.3/24" }, new StringWriter()));
        Assert.Equal((UnixFileMode)0b110_000_000, File.GetUnixFileMode(Path.Combine(dir, "private.key")));
        UpConfig c = UpConfig.Load(new[] { "up", "--config", Path.Combine(dir, "veil.toml") }, 1);
        Assert.Equal("100.64.0.3/24", c.Addresses[0].ToString());
        string key = File.ReadAllText(Path.Combine(dir, "private.key"));
        Assert.Throws<ConfigException>(() => OnboardingCli.Init(new[] { "init", "--dir", dir }, new StringWriter()));
        Assert.Equal(key, File.ReadAllText(Path.Combine(dir, "private.key")));
    }

    [Fact]
    public void AddPeer_AppendsValidPeer_RefusesDuplicatesAndBadInput_FileUnchangedOnError()
    {
        string dir = Path.Combine(_dir, "m");
        OnboardingCli.Init(new[] { "init", "--dir", dir }, new StringWriter());
        string cfg = Path.Combine(dir, "veil.toml");
        string pub = Pub(50).ToBase64();
        Assert.Equal(0, OnboardingCli.AddPeer(new[] { "add-peer", "--config", cfg, "--peer", pub + "@198.51.100.5:51820", "--allow", "100.64.0.5/32", "--name", "five", "--keepalive", "25" }, new StringWriter()));
        UpConfig c = UpConfig.Load(new[] { "up", "--config", cfg }, 1);
        PeerConfig p = Assert.Single(c.Peers);
        Assert.Equal("five", p.Name);
        Assert.Equal(25_000, p.KeepaliveMs);
        string before = File.ReadAllText(cfg);
        Assert.Throws<ConfigException>(() => OnboardingCli.AddPeer(new[] { "add-peer", "--config", cfg, "--peer", pub }, new StringWriter()));
        Assert.Throws<ConfigException>(() => OnboardingCli.AddPeer(new[] { "add-peer", "--config", cfg, "--peer", "nope" }, new StringWriter()));
        Assert.Throws<ConfigException>(() => OnboardingCli.AddPeer(new[] { "add-peer", "--config", cfg, "--peer", Pub(51).ToBase64(), "--allow", "10.0.0.0/33" }, new StringWriter()));
        var e = Assert.Throws<ConfigException>(() => OnboardingCli.AddPeer(new[] { "add-peer", "--config", cfg, "--peer", Pub(51).ToBase64(), "--name", "two words" }, new StringWriter()));
        Assert.Equal("add-peer: --name 'two words' must be 1 to 32 letters, digits, '-', '_' or '.'", e.Message);   // not a line of the appended text
        Assert.Equal(before, File.ReadAllText(cfg));
    }

    [Fact]
    public void Init_WithARelativeDir_WritesAKeyPathTheFileFinds()
    {
        // Relative paths in a config file are relative to the file; what init writes must still work
        // when --dir was relative (the working directory is left alone: tests run in parallel).
        string rel = Path.GetRelativePath(Directory.GetCurrentDirectory(), Path.Combine(_dir, "rel"));
        Assert.Equal(0, OnboardingCli.Init(["init", "--dir", rel], new StringWriter()));
        UpConfig c = UpConfig.Load(["up", "--config", Path.Combine(rel, "veil.toml")], 1);
        Assert.Equal(Path.Combine(_dir, "rel", "private.key"), c.KeyFile);
    }

    [Fact]
    public void AddPeer_AndUp_WarnAboutAPrefixTwoPeersHold_AndADefaultRoute()
    {
        string dir = Path.Combine(_dir, "w");
        OnboardingCli.Init(new[] { "init", "--dir", dir }, new StringWriter());
        string cfg = Path.Combine(dir, "veil.toml");
        var o = new StringWriter();
        Assert.Equal(0, OnboardingCli.AddPeer(new[] { "add-peer", "--config", cfg, "--peer", Pub(50).ToBase64(), "--allow", "10.0.0.0/24", "--name", "one" }, o));
        Assert.DoesNotContain("warning", o.ToString());
        o = new StringWriter();
        Assert.Equal(0, OnboardingCli.AddPeer(new[] { "add-peer", "--config", cfg, "--peer", Pub(51).ToBase64(), "--allow", "10.0.0.0/24", "--allow", "0.0.0.0/0", "--name", "two" }, o));
        Assert.Contains("warning: 10.0.0.0/24 is allowed for both one and two: only one of them gets its traffic\n", o.ToString());
        Assert.Contains("warning: peer two: 0.0.0.0/0 sends all IPv4 traffic without a more specific route into the tunnel\n", o.ToString());
        Assert.Equal(2, UpConfig.Load(new[] { "up", "--config", cfg }, 1).AllowedWarnings().Count);
    }

    // About one key in five starts with a '+' or '/' among its first 8 base64 characters; its default
    // name must still be a valid name (it used to make add-peer fail, and members rename the peer).
    [Fact]
    public void AddPeer_KeyWhoseStartHasPlusOrSlash_GetsAValidDefaultName()
    {
        string dir = Path.Combine(_dir, "n");
        OnboardingCli.Init(new[] { "init", "--dir", dir }, new StringWriter());
        string cfg = Path.Combine(dir, "veil.toml");
        Key32 odd = default;
        for (byte seed = 60; ; seed++)
            if (Pub(seed).ToBase64()[..8].IndexOfAny(['+', '/']) >= 0) { odd = Pub(seed); break; }
        Assert.Equal(0, OnboardingCli.AddPeer(new[] { "add-peer", "--config", cfg, "--peer", odd.ToBase64() }, new StringWriter()));
        PeerConfig p = Assert.Single(UpConfig.Load(new[] { "up", "--config", cfg }, 1).Peers);
        Assert.Equal(odd.DefaultName(), p.Name);
        Assert.Equal(odd.ToBase64()[..8].Replace('+', '-').Replace('/', '_'), p.Name);
        Assert.Equal(p.Name, new Peer(0, new PeerConfig { PublicKey = odd }, default, 0, 1420).Name);   // the node agrees
    }

    [Fact]
    public void Doctor_ReportsEachCheckOnItsOwnLine_FailsOnBadConfig()
    {
        var o = new StringWriter();
        int rc = Doctor.Run(new[] { "doctor", "--config", Path.Combine(_dir, "missing.toml") }, o);
        Assert.Equal(1, rc);
        string text = o.ToString();
        Assert.Contains("FAIL config:", text);
        Assert.Contains("tun:", text);
        Assert.Contains("clock:", text);
    }

    // veil service in a scratch root, with systemctl stood in for (tests/netns/service.sh runs the
    // real one offline and systemd-analyze verify on the unit).
    private (string Root, string Binary, List<string> Calls, Func<string[], (int, string)> Systemctl) ServiceRoot()
    {
        string root = Path.Combine(_dir, "root"), binary = Path.Combine(_dir, "veil-build");
        Directory.CreateDirectory(root);
        File.WriteAllText(binary, "not really an ELF");
        var calls = new List<string>();
        return (root, binary, calls, a => { calls.Add(string.Join(' ', a)); return (0, ""); });
    }

    [Fact]
    public void Service_InstallUninstall_RoundTrip_KeepsConfigsAndKeys()
    {
        var (root, binary, calls, systemctl) = ServiceRoot();
        var o = new StringWriter();
        Assert.Equal(0, ServiceCli.Install(root, "lab", binary, live: false, systemctl, o));
        string bin = root + ServiceCli.BinaryPath, unit = root + ServiceCli.UnitPath, dir = root + ServiceCli.ConfigDir;
        Assert.Equal("not really an ELF", File.ReadAllText(bin));
        Assert.Equal((UnixFileMode)0b111_101_101, File.GetUnixFileMode(bin));
        Assert.Equal((UnixFileMode)0b111_000_000, File.GetUnixFileMode(dir));
        string text = File.ReadAllText(unit);
        Assert.Equal(ServiceCli.Unit(), text);
        Assert.Contains("ExecStart=/usr/local/bin/veil up --config /etc/veil/%i.toml\n", text);
        Assert.Contains("CapabilityBoundingSet=CAP_NET_ADMIN\n", text);
        Assert.Contains("AmbientCapabilities=CAP_NET_ADMIN\n", text);
        Assert.Contains("Restart=on-failure\n", text);
        Assert.Contains("RestartPreventExitStatus=2\n", text);                     // a bad config is not retried
        Assert.Equal([$"--root={root} enable veil@lab.service"], calls);
        Assert.Contains("next: write /etc/veil/lab.toml", o.ToString());

        // again, with a config and a key in place: the same files, nothing of the user's touched
        File.WriteAllText(Path.Combine(dir, "lab.toml"), "key = \"/etc/veil/private.key\"\n");
        File.WriteAllText(Path.Combine(dir, "private.key"), "secret");
        o = new StringWriter();
        Assert.Equal(0, ServiceCli.Install(root, "lab", binary, live: false, systemctl, o));
        Assert.Contains("start: systemctl start veil@lab.service", o.ToString());

        calls.Clear();
        o = new StringWriter();
        Assert.Equal(0, ServiceCli.Uninstall(root, live: false, systemctl, o));
        Assert.Equal([$"--root={root} disable veil@.service"], calls);
        Assert.False(File.Exists(unit));
        Assert.False(File.Exists(bin));
        Assert.Equal("secret", File.ReadAllText(Path.Combine(dir, "private.key")));
        Assert.Contains("kept " + dir, o.ToString());
        o = new StringWriter();
        Assert.Equal(0, ServiceCli.Uninstall(root, live: false, systemctl, o));             // twice: nothing to do
        Assert.Contains("not installed", o.ToString());
    }

    [Fact]
    public void Service_LiveSystem_ReloadsEnablesStopsAndDisables()
    {
        var (root, binary, calls, systemctl) = ServiceRoot();
        Assert.Equal(0, ServiceCli.Install(root, "veil", binary, live: true, systemctl, new StringWriter()));
        Assert.Equal(["daemon-reload", "enable veil@veil.service"], calls);
        calls.Clear();
        Assert.Equal(0, ServiceCli.Uninstall(root, live: true, systemctl, new StringWriter()));
        Assert.Equal(["stop veil@*.service", "disable veil@.service", "daemon-reload"], calls);
    }

    [Fact]
    public void Service_BadInput_RefusedAndNothingChanged()
    {
        var (root, binary, calls, systemctl) = ServiceRoot();
        Assert.Throws<ConfigException>(() => ServiceCli.Run(["service"], new StringWriter()));
        Assert.Throws<ConfigException>(() => ServiceCli.Run(["service", "start"], new StringWriter()));
        Assert.Throws<ConfigException>(() => ServiceCli.Run(["service", "install", "--root", root, "--name", "../x"], new StringWriter()));
        Assert.Throws<ConfigException>(() => ServiceCli.Run(["service", "install", "--root", root, "--bogus"], new StringWriter()));
        Assert.Throws<ConfigException>(() => ServiceCli.Install(root, "lab", binary + ".missing", false, systemctl, new StringWriter()));
        Assert.Empty(Directory.GetFileSystemEntries(root));
        // a unit file someone else wrote is neither replaced nor removed
        string unit = root + ServiceCli.UnitPath;
        Directory.CreateDirectory(Path.GetDirectoryName(unit)!);
        File.WriteAllText(unit, "[Service]\nExecStart=/usr/bin/other\n");
        Assert.Throws<ConfigException>(() => ServiceCli.Install(root, "lab", binary, false, systemctl, new StringWriter()));
        Assert.Throws<ConfigException>(() => ServiceCli.Uninstall(root, false, systemctl, new StringWriter()));
        Assert.Equal("[Service]\nExecStart=/usr/bin/other\n", File.ReadAllText(unit));
        Assert.False(File.Exists(root + ServiceCli.BinaryPath));
        Assert.Empty(calls);
        // a failing systemctl is reported, not ignored
        File.Delete(unit);
        var e = Assert.Throws<ConfigException>(() => ServiceCli.Install(root, "lab", binary, false, _ => (1, "Failed to enable unit"), new StringWriter()));
        Assert.Contains("Failed to enable unit", e.Message);
    }
}
