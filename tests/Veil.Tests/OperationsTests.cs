using System.Net;
using System.Text.Json;

namespace Veil.Tests;

/// <summary>Reload, admission, status/metrics rendering and JSON logs, in process.</summary>
public class OperationsTests
{
    private static UpConfig ConfigOf(TestNode n)
    {
        var cfg = new UpConfig { PrivateKey = n.Private, Mtu = 1420 };
        foreach (Peer p in n.Node.Peers)
        {
            if (!p.Active) continue;
            var pc = new PeerConfig { PublicKey = p.PublicKey, Endpoint = p.Endpoint, Name = p.Name };
            pc.Allowed.AddRange(p.Allowed);
            cfg.Peers.Add(pc);
        }
        return cfg;
    }

    [Fact]
    public void Apply_UnchangedPeers_KeepTheirSessions()
    {
        var t = TestNet.FullMesh(3);
        t.Start();
        Session before = t.Nodes[0].Node.Peers[0].Current!;
        t.Nodes[0].Node.Apply(ConfigOf(t.Nodes[0]), t.NowMs);
        Assert.Same(before, t.Nodes[0].Node.Peers[0].Current);
        Assert.Equal(1, t.Send(0, 1));
    }

    [Fact]
    public void Apply_RemovedPeer_SessionsRoutesAndKeyGone_OthersUntouched()
    {
        var t = TestNet.FullMesh(3);
        t.Start();
        var cfg = ConfigOf(t.Nodes[0]);
        cfg.Peers.RemoveAt(1);                        // drop node 2
        Session kept = t.Nodes[0].Node.Peers[0].Current!;
        t.Nodes[0].Node.Apply(cfg, t.NowMs);
        Peer removed = t.Nodes[0].Node.Peers[1];
        Assert.False(removed.Active);
        Assert.Null(removed.Current);
        Assert.True(removed.StaticShared.IsZero());
        Assert.Equal(0, t.Send(0, 2));
        Assert.Equal(1, t.Drops(0, DropReason.NoRoute));
        Assert.Same(kept, t.Nodes[0].Node.Peers[0].Current);
        Assert.Equal(1, t.Send(0, 1));
        // node 2 can no longer get in either
        Assert.Equal(0, t.Send(2, 0));
    }

    [Fact]
    public void Apply_AddedPeer_ReusesFreedSlotAndConnects()
    {
        var t = TestNet.FullMesh(3);
        t.Start();
        var cfg = ConfigOf(t.Nodes[0]);
        PeerConfig third = cfg.Peers[1];
        cfg.Peers.RemoveAt(1);
        t.Nodes[0].Node.Apply(cfg, t.NowMs);
        cfg.Peers.Add(third);
        t.Nodes[0].Node.Apply(cfg, t.NowMs);
        t.Pump();
        Assert.Equal(2, t.Nodes[0].Node.Peers.Count);          // the slot was reused
        Assert.Equal(1, t.Send(0, 2));
        Assert.Equal(1, t.Send(2, 0));
    }

    [Fact]
    public void Apply_ChangedAllowedIps_RoutesFollow_SessionKept()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        var cfg = ConfigOf(t.Nodes[0]);
        cfg.Peers[0].Allowed.Add(IpPrefix.Parse("203.0.113.0/24"));
        cfg.Peers[0].Name = "renamed";
        Session s = t.Nodes[0].Node.Peers[0].Current!;
        t.Nodes[0].Node.Apply(cfg, t.NowMs);
        Assert.Same(s, t.Nodes[0].Node.Peers[0].Current);
        Assert.Equal("renamed", t.Nodes[0].Node.Peers[0].Name);
        Assert.Equal(0, t.Nodes[0].Node.Routes.Lookup(IPAddress.Parse("203.0.113.7").GetAddressBytes()));
    }

    [Fact]
    public void Admission_PerSourceRate_DropsExcess_OtherSourcesUnaffected()
    {
        var a = new Admission(1000, 3, 10);
        var x = Endpoint.FromIp(IPAddress.Parse("198.51.100.7"), 1);
        var y = Endpoint.FromIp(IPAddress.Parse("198.51.100.8"), 1);
        int allowed = 0;
        for (int i = 0; i < 10; i++) if (a.AllowSource(x, 5000)) allowed++;
        Assert.Equal(3, allowed);
        Assert.Equal(7, a.RefusedSource);
        Assert.True(a.AllowSource(y, 5000));
        Assert.True(a.AllowSource(x, 5000 + 400));             // a token refills after 1/3 s
        Assert.False(a.AllowSource(x, 5000 + 400));
    }

    [Fact]
    public void Admission_GlobalRate_UnderLoadThenRecovers()
    {
        var a = new Admission(5, 100, 10);
        int load = 0;
        for (int i = 0; i < 8; i++) if (a.UnderLoad(1000)) load++;
        Assert.Equal(3, load);
        Assert.False(a.UnderLoad(2000));
    }

    [Fact]
    public void Admission_SourceTable_Bounded()
    {
        var a = new Admission(1000, 3, 10);
        for (uint i = 0; i < 10_000; i++) a.AllowSource(Endpoint.FromV4(0xC6336400 + i, 1), 1000);
        Assert.True(a.TrackedSources <= 4096);
    }

    [Fact]
    public void HelloFlood_ForgingThePeersAddress_CannotLockItOut()
    {
        var t = TestNet.FullMesh(2, c => { c.HandshakeRate = 20; c.HandshakeRatePerSource = 2; });
        byte[]? hello = null;
        t.Net.Filter = (from, _, d) => { if (d[0] == Spec.TlsHandshake && d[5] == 1) hello ??= d; return false; };
        t.Nodes[0].Node.Start(t.NowMs);
        t.Nodes[0].Worker.FlushUdp(t.Nodes[0].Node.UdpOut);
        t.Net.Filter = null;
        // 200 copies "from" node 0's own address: they drain the global budget, earn only cookie
        // replies, and never touch the per-source budget of that address
        for (int i = 0; i < 200; i++) t.Nodes[1].Udp.Deliver(hello!, t.Nodes[0].Endpoint);
        t.Pump();
        Admission a = t.Nodes[1].Node.Admission;
        Assert.True(t.Nodes[1].Node.Counters.CookiesSent >= 150, $"cookies {t.Nodes[1].Node.Counters.CookiesSent}");
        Assert.Equal(0, a.RefusedSource);
        t.Nodes[0].Tun.Inject(Packets.Udp4("100.64.0.1", "100.64.0.2", 10));
        t.Advance(3000);                               // the real peer retransmits with its cookie
        Assert.Single(t.Nodes[1].Tun.Written);
    }

    [Fact]
    public void UnderLoad_ProvenSourceWithinBudget_Admitted()
    {
        var t = TestNet.FullMesh(2, c => c.HandshakeRatePerSource = 1);
        t.Nodes[1].Node.Admission.ForceUnderLoad = true;
        t.Nodes[0].Tun.Inject(Packets.Udp4("100.64.0.1", "100.64.0.2", 10));
        t.Pump();                                      // cookie reply
        t.Advance(1500);                               // retransmit with MAC2: spends the source's one token
        Assert.Single(t.Nodes[1].Tun.Written);
        Assert.Equal(0, t.Nodes[1].Node.Admission.RefusedSource);
    }

    [Fact]
    public void StatusJson_ParsesAndHasTheContractKeys()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        t.Send(0, 1);
        var view = new StatusView(t.Nodes[0].Node, ConfigOf(t.Nodes[0]), 51820, t.NowMs, () => t.NowMs);
        using var doc = JsonDocument.Parse(view.Json());
        JsonElement r = doc.RootElement;
        foreach (string k in new[] { "version", "node", "uptime_seconds", "counters", "drops", "sessions", "peers", "routes", "admission" })
            Assert.True(r.TryGetProperty(k, out _), k);
        Assert.Equal("up", r.GetProperty("peers")[0].GetProperty("state").GetString());
        Assert.True(r.GetProperty("counters").GetProperty("tx_records").GetInt64() > 0);
        Assert.Equal(2, r.GetProperty("routes").GetArrayLength());
        Assert.True(r.GetProperty("sessions").GetArrayLength() >= 1);
        Assert.Contains(r.GetProperty("sessions")[0].GetProperty("aead").GetString(), new[] { "ChaCha20Poly1305", "Aes256Gcm" });
        JsonElement dp = r.GetProperty("node").GetProperty("datapath");
        foreach (string k in new[] { "tun_tso", "tun_uso", "udp_gso", "udp_gro" })
            Assert.Equal(JsonValueKind.False, dp.GetProperty(k).ValueKind);       // stand-in dataplane and sockets: no offloads
        Assert.Equal(Aead.Backend, dp.GetProperty("aead_backend").GetString());
        using var peers = JsonDocument.Parse(view.PeersJson());
        Assert.Equal(JsonValueKind.Array, peers.RootElement.ValueKind);
        using var routes = JsonDocument.Parse(view.RoutesJson());
        Assert.Equal("100.64.0.2/32", routes.RootElement[0].GetProperty("prefix").GetString());
    }

    [Fact]
    public void Metrics_EverySampleHasHelpAndType_NamesFollowConventions()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        t.Send(0, 1);
        string m = new StatusView(t.Nodes[0].Node, ConfigOf(t.Nodes[0]), 51820, t.NowMs, () => t.NowMs).Metrics();
        var typed = new HashSet<string>();
        foreach (string line in m.Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            if (line.StartsWith("# TYPE ")) { typed.Add(line.Split(' ')[2]); continue; }
            if (line.StartsWith('#')) continue;
            string name = line.Split('{', ' ')[0];
            Assert.Contains(name, typed);
            Assert.Matches("^[a-z_:][a-z0-9_:]*$", name);
            Assert.True(double.TryParse(line[(line.LastIndexOf(' ') + 1)..], System.Globalization.CultureInfo.InvariantCulture, out _), line);
            if (name.EndsWith("_total")) Assert.Contains($"# TYPE {name} counter", m);
        }
        Assert.Contains("veil_sent_bytes_total ", m);
        Assert.Matches(@"veil_peer_sent_bytes_total\{peer=""[^""]+"",public_key=""[^""]+""\} [1-9]", m);
    }
}
