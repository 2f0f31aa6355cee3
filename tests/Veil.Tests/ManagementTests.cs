using System.Text.Json;

namespace Veil.Tests;

/// <summary>§17 status and metrics rendering: the JSON contract keys and the Prometheus exposition rules.</summary>
public class ManagementTests
{
    [Fact]
    public void StatusJson_ParsesAndHasTheContractKeys()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        t.Send(0, 1);
        var view = new StatusView(t.Nodes[0].Node, TestNet.ConfigOf(t.Nodes[0]), 51820, t.NowMs, () => t.NowMs);
        using var doc = JsonDocument.Parse(view.Json());
        JsonElement r = doc.RootElement;
        foreach (string k in new[] { "version", "node", "uptime_seconds", "counters", "drops", "sessions", "peers", "routes", "admission" })
            Assert.True(r.TryGetProperty(k, out _), k);
        Assert.Equal("up", r.GetProperty("peers")[0].GetProperty("state").GetString());
        Assert.True(r.GetProperty("counters").GetProperty("tx_records").GetInt64() > 0);
        Assert.Equal(2, r.GetProperty("routes").GetArrayLength());
        Assert.True(r.GetProperty("sessions").GetArrayLength() >= 1);
        Assert.Contains(r.GetProperty("sessions")[0].GetProperty("aead").GetString(), new[] { "chacha20-poly1305", "aes-256-gcm" });   // as --cipher spells them
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
        string m = new StatusView(t.Nodes[0].Node, TestNet.ConfigOf(t.Nodes[0]), 51820, t.NowMs, () => t.NowMs).Metrics();
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
