using System.Net;
using System.Text.Json;

namespace Veil.Tests;

/// <summary>§17 status for people and scripts: units and ages, RTT, handshake trouble, roaming,
/// warnings, the short and dump views, health, and the JSON schema README documents.</summary>
public class StatusTests
{
    private static StatusView View(TestNet t, int i = 0) =>
        new(t.Nodes[i].Node, TestNet.ConfigOf(t.Nodes[i]), 51820, t.NowMs, () => t.NowMs);

    private static JsonElement PeerJson(StatusView v, int i = 0)
    {
        using var doc = JsonDocument.Parse(v.PeersJson());
        return doc.RootElement[i].Clone();
    }

    [Theory]
    [InlineData(0, "0 B")]
    [InlineData(1023, "1023 B")]
    [InlineData(1024, "1.00 KiB")]
    [InlineData(254_467, "249 KiB")]
    [InlineData(10 * 1024 * 1024 + 512 * 1024, "10.5 MiB")]
    [InlineData(3L << 40, "3.00 TiB")]
    public void Iec_BinaryUnits(long bytes, string expect) => Assert.Equal(expect, StatusView.Iec(bytes));

    [Theory]
    [InlineData(0, "0 s")]
    [InlineData(59_999, "59 s")]
    [InlineData(200_000, "3 min 20 s")]
    [InlineData(86_400_000, "1 d 0 h")]
    [InlineData(3 * 3_600_000 + 5 * 60_000, "3 h 5 min")]
    public void Age_TwoLargestUnits(long ms, string expect) => Assert.Equal(expect, StatusView.Age(ms));

    [Fact]
    public void Rtt_MeasuredOnBothSides_ByTheHandshake()
    {
        var t = TestNet.FullMesh(2);
        Assert.Null(PeerJson(View(t)).GetProperty("rtt_ms").GetString());
        Assert.DoesNotContain("veil_peer_rtt_seconds{", View(t).Metrics());      // no sample: no series
        t.Start();
        t.Send(0, 1);
        foreach (int i in new[] { 0, 1 })
        {
            JsonElement rtt = PeerJson(View(t, i)).GetProperty("rtt_ms");
            Assert.Equal(JsonValueKind.Number, rtt.ValueKind);
            Assert.True(rtt.GetDouble() is >= 0 and < 10_000, $"node {i}: rtt {rtt.GetDouble()} ms");
        }
        Assert.Matches(@"\n  rtt: [0-9.]+ ms \(latest handshake\)\n", View(t).Text());
        Assert.Matches(@"\nveil_peer_rtt_seconds\{peer=""[^""]+"",public_key=""[^""]+""\} [0-9.E-]+\n", View(t).Metrics());
    }

    [Fact]
    public void NeverIsNull_CipherAsTheFlagSpellsIt()
    {
        var t = TestNet.FullMesh(2);
        JsonElement p = PeerJson(View(t));
        foreach (string k in new[] { "latest_handshake", "latest_handshake_s", "last_seen_s", "last_direct_s", "aead", "rtt_ms", "previous_endpoint", "up_s" })
            Assert.True(p.GetProperty(k).ValueKind == JsonValueKind.Null, k);
        t.Start();
        t.Send(0, 1);
        p = PeerJson(View(t));
        Assert.True(p.GetProperty("latest_handshake").GetInt64() > 1_600_000_000);
        Assert.Equal(0, p.GetProperty("latest_handshake_s").GetInt64());
        double upS = p.GetProperty("up_s").GetDouble();
        t.Advance(1_234);
        Assert.Equal(upS + 1.234, PeerJson(View(t)).GetProperty("up_s").GetDouble(), 3);   // to the millisecond
        Assert.Contains(p.GetProperty("aead").GetString(), new[] { "chacha20-poly1305", "aes-256-gcm" });
    }

    [Fact]
    public void Handshaking_ShowsAttemptsNextRetryAndWhyTheLastFailed()
    {
        var t = TestNet.FullMesh(2);
        t.Net.Filter = (_, _, _) => false;                 // nothing arrives
        t.Start();
        t.Advance(6_000);
        StatusView v = View(t);
        JsonElement p = PeerJson(v);
        Assert.Equal("handshaking", p.GetProperty("state").GetString());
        JsonElement h = p.GetProperty("handshake");
        Assert.True(h.GetProperty("attempts").GetInt32() >= 2);
        Assert.Equal(JsonValueKind.Number, h.GetProperty("next_retry_s").ValueKind);
        Assert.Equal("no_answer", h.GetProperty("last_failure").GetString());
        string text = v.Text();
        Assert.Matches(@"\n  handshake: attempt [0-9]+, next in [0-9]+ s\n  last failure: no answer to the last hello \([0-9]+ s ago\)\n", text);
        Assert.Contains("  peers: 0 of 1 up\n  warning: no peer up\n", text);
    }

    [Fact]
    public void Roaming_CountedWithThePreviousEndpoint()
    {
        var t = TestNet.FullMesh(2);
        t.Start();
        Endpoint before = t.Nodes[1].Udp.Self, moved = Endpoint.FromIp(IPAddress.Parse("203.0.113.9"), 40000);
        t.Nodes[1].Udp.Dispose();
        t.Nodes[1].Udp.Self = moved;
        t.Net.Hosts[moved] = t.Nodes[1].Udp;
        Assert.Equal(1, t.Send(1, 0));
        JsonElement p = PeerJson(View(t));
        Assert.Equal(1, p.GetProperty("endpoint_changes").GetInt64());
        Assert.Equal(before.ToString(), p.GetProperty("previous_endpoint").GetString());
        Assert.Equal(moved.ToString(), p.GetProperty("endpoint").GetString());
        Assert.Contains($"  endpoint changes: 1 (before: {before})\n", View(t).Text());
        Assert.Contains("event=endpoint_changed", t.Nodes[0].LogText.ToString());
    }

    [Fact]
    public void Warnings_RouteConflict_AndNoneWhenAllIsWell()
    {
        var t = TestNet.FullMesh(3);
        t.Start();
        t.Send(0, 1);
        t.Send(0, 2);
        Assert.Empty(View(t).Warnings(t.NowMs));
        Peer c = TestNet.PeerOf(t.Nodes[0], t.Nodes[2]);
        c.Allowed.Add(TestNet.PeerOf(t.Nodes[0], t.Nodes[1]).Allowed[0]);    // two peers allowed the same /32
        string w = Assert.Single(View(t).Warnings(t.NowMs));
        Assert.StartsWith("route conflict: 100.64.0.2/32 is allowed for ", w);
    }

    [Fact]
    public void Health_AndHealthzGrace()
    {
        var t = TestNet.FullMesh(2);
        StatusView v = View(t);
        Assert.StartsWith("down: no peer up", v.Health());
        Assert.Null(v.Unhealthy(graceMs: 10_000));                 // starting: within the grace time
        t.NowMs += 10_001;
        Assert.Equal("no peer up for 10 s", v.Unhealthy(graceMs: 10_000));
        t.Start();
        t.Send(0, 1);
        Assert.Equal("ok: 1 of 1 peers up\n", v.Health());
        Assert.Null(v.Unhealthy(graceMs: 0));
    }

    [Fact]
    public void Healthz_GraceCountsFromWhenTheLastUpPeerWasRemoved()
    {
        var t = TestNet.FullMesh(2);
        StatusView v = View(t);
        t.Start();
        t.Send(0, 1);
        t.NowMs += 60_000;                                          // up for a minute
        t.Send(0, 1);
        t.Nodes[0].Node.RemovePeer(TestNet.PeerOf(t.Nodes[0], t.Nodes[1]));
        Assert.Null(v.Unhealthy(graceMs: 10_000));                 // it was up until just now
        t.NowMs += 10_001;
        Assert.Equal("no peer up for 10 s", v.Unhealthy(graceMs: 10_000));
    }

    [Fact]
    public void Short_OneLinePerPeer_Dump_TabSeparatedFixedFields()
    {
        var t = TestNet.FullMesh(3);
        t.Start();
        t.Send(0, 1);
        StatusView v = View(t);
        string[] lines = v.Short().TrimEnd('\n').Split('\n');
        Assert.Equal(3, lines.Length);
        Assert.Matches(@"^# veil0, [12] of 2 peers up", lines[0]);
        Assert.Matches(@"^100\.64\.0\.2 +\S+ +up +direct +rtt [0-9.]+ ms +rx [0-9.]+ (B|KiB) +tx [0-9.]+ (B|KiB) +handshake [0-9]+ s ago$", lines[1]);
        string[] dump = v.Dump().TrimEnd('\n').Split('\n');
        Assert.Equal(3, dump.Length);
        string[] node = dump[0].Split('\t');
        Assert.Equal(8, node.Length);
        Assert.Equal("node", node[0]);
        foreach (string line in dump[1..])
        {
            string[] f = line.Split('\t');
            Assert.Equal(13, f.Length);
            Assert.Equal("peer", f[0]);
            Assert.DoesNotContain("", f);                          // "-" stands for unknown: awk sees every column
        }
        Assert.Equal("up", dump[1].Split('\t')[5]);
    }

    // ---- The JSON schema: README's block lists every path; the output has no other ----

    private static IEnumerable<(string Path, string Kind)> Paths(JsonElement e, string at)
    {
        switch (e.ValueKind)
        {
            case JsonValueKind.Object:
                yield return (at, "object");
                foreach (JsonProperty p in e.EnumerateObject())
                    foreach (var x in Paths(p.Value, at.Length == 0 ? p.Name : at + "." + p.Name)) yield return x;
                break;
            case JsonValueKind.Array:
                yield return (at, "array");
                foreach (JsonElement i in e.EnumerateArray())
                    foreach (var x in Paths(i, at + "[]")) yield return x;
                break;
            case JsonValueKind.String: yield return (at, "string"); break;
            case JsonValueKind.Number: yield return (at, "number"); break;
            case JsonValueKind.True or JsonValueKind.False: yield return (at, "bool"); break;
            default: yield return (at, "null"); break;
        }
    }

    internal static string SchemaOf(string json)
    {
        using var doc = JsonDocument.Parse(json);
        var kinds = new SortedDictionary<string, SortedSet<string>>(StringComparer.Ordinal);
        foreach (var (path, kind) in Paths(doc.RootElement, ""))
            if (path.Length > 0) (kinds.TryGetValue(path, out var k) ? k : kinds[path] = new()).Add(kind);
        return string.Join('\n', kinds.Select(kv => kv.Key + " " + string.Join('|', kv.Value)));
    }

    private static Dictionary<string, string[]> DocumentedSchema()
    {
        string readme = File.ReadAllText(Path.Combine(Vectors.Dir, "..", "..", "README.md"));
        int at = readme.IndexOf("<!-- status-schema -->\n```\n", StringComparison.Ordinal);
        Assert.True(at >= 0, "README has no status-schema block");
        at = readme.IndexOf('\n', readme.IndexOf("```", at, StringComparison.Ordinal)) + 1;
        string block = readme[at..readme.IndexOf("```", at, StringComparison.Ordinal)];
        var doc = new Dictionary<string, string[]>();
        foreach (string line in block.Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            string[] f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            doc[f[0]] = f[1].Split('|');
        }
        return doc;
    }

    [Fact]
    public void Json_IsExactlyTheSchemaReadmeDocuments()
    {
        Dictionary<string, string[]> doc = DocumentedSchema();
        string Plain(string path) => path.Replace("?", "");
        var documented = doc.ToDictionary(kv => Plain(kv.Key), kv => kv.Value);
        // Several nodes between them show every feature that has a key: a peer up and one never seen,
        // a claim, a warning, workers, a TCP listener and a port mapping attempt.
        var t = TestNet.Mesh(3, i => i == 0 ? [1, 2] : [0], (i, c) => { if (i == 1) c.Claims.Add(IpPrefix.Parse("10.9.0.0/24")); });
        t.Start();
        t.Advance(2_000);
        t.Send(0, 1);
        var seen = new Dictionary<string, HashSet<string>>();
        void Take(string json)
        {
            using var d = JsonDocument.Parse(json);
            foreach (var (path, kind) in Paths(d.RootElement, ""))
                if (path.Length > 0) (seen.TryGetValue(path, out var k) ? k : seen[path] = new()).Add(kind);
        }
        Take(View(t, 0).Json());
        int epfd = Libc.EpollCreate1(Libc.EPOLL_CLOEXEC);
        using (var tcp = new TcpLinks(epfd))
        using (var mapper = new PortMapper(0, _ => { }, new Log(TextWriter.Null, LogLevel.Error), []))   // tries nothing
        {
            Assert.True(SpinWait.SpinUntil(() => mapper.Current.Error != "starting", 5_000), "the port mapper never reported");
            mapper.Current = new PortMapper.State("pcp", IPAddress.Parse("192.0.2.1"), Endpoint.FromIp(IPAddress.Parse("192.0.2.9"), 40000), 7200, null, "pcp");
            t.Nodes[0].Node.Tcp = tcp;
            Take(new StatusView(t.Nodes[0].Node, TestNet.ConfigOf(t.Nodes[0]), 51820, t.NowMs, () => t.NowMs) { Workers = [t.Nodes[0].Worker], Mapper = mapper }.Json());
            t.Nodes[0].Node.Tcp = null;
        }
        Libc.Close(epfd);
        var l2 = SwitchTests.Three();                                       // --mode tap: the switch and its MAC table
        SwitchTests.Inject(l2, 1, SwitchTests.Frame(SwitchTests.Broadcast, SwitchTests.A));
        Take(new StatusView(l2.Nodes[0].Node, new UpConfig { Mode = L2Mode.Tap, Mtu = 1420 }, 51820, 0, () => l2.NowMs).Json());
        foreach (var (path, kinds) in seen)
        {
            Assert.True(documented.TryGetValue(path, out string[]? allowed), $"README's status schema lacks {path}");
            foreach (string k in kinds) Assert.True(allowed!.Contains(k), $"{path} is {k}; README says {string.Join('|', allowed!)}");
        }
        // What is documented is produced, except inside arrays (which may be empty here) and features marked '?'.
        foreach (string path in doc.Keys)
        {
            bool optional = path.Contains('?') || doc.Keys.Any(o => o.EndsWith('?') && path.StartsWith(Plain(o) + ".", StringComparison.Ordinal));
            if (!optional && !path.Contains("[]")) Assert.True(seen.ContainsKey(path), $"README documents {path}, which the status JSON does not have");
        }
    }
}
