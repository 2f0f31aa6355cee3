using System.Net;

namespace Veil.Tests;

/// <summary>Issue 14's scale point on one node: a hub with 1,000 configured peers, default flags.
/// Every handshake completes and every session stays up through rekeys and keepalives; the figures
/// (managed memory per peer, the hub's timer work) are printed, never asserted.</summary>
public class ThousandPeersTests(Xunit.Abstractions.ITestOutputHelper output)
{
    private static Key32 KeyOf(int n)
    {
        Key32 k = default;
        System.Security.Cryptography.SHA256.HashData(BitConverter.GetBytes(n + 1000), k);
        k[0] &= 248; k[31] &= 127; k[31] |= 64;
        return k;
    }

    private static Endpoint EpOf(int i) => Endpoint.FromIp(IPAddress.Parse($"198.51.100.{i / 250}"), 20000 + i % 250);

    [Fact]
    public void Hub_WithAThousandPeers_AllUp_AndStayUp()
    {
        const int n = 1000;
        var t = new TestNet();
        var pubs = new Key32[n + 1];
        for (int i = 0; i <= n; i++)
        {
            Key32 priv = KeyOf(i);
            X25519.PublicKey(pubs[i], priv);
        }
        long before = GC.GetTotalMemory(forceFullCollection: true);
        var hubCfg = new UpConfig { PrivateKey = KeyOf(0), Mtu = 1420, MaxSessions = Tune.DefaultMaxSessions };
        for (int i = 1; i <= n; i++)
        {
            var pc = new PeerConfig { PublicKey = pubs[i] };
            pc.Allowed.Add(IpPrefix.Parse($"100.64.{i / 250}.{i % 250 + 1}/32"));
            hubCfg.Peers.Add(pc);
        }
        TestNode hub = t.AddNode(KeyOf(0), hubCfg, EpOf(0), "100.64.0.250");
        long hubBytes = GC.GetTotalMemory(forceFullCollection: true) - before;
        for (int i = 1; i <= n; i++)
        {
            var cfg = new UpConfig { PrivateKey = KeyOf(i), Mtu = 1420, PersistentKeepaliveMs = 25_000 };
            var pc = new PeerConfig { PublicKey = pubs[0], Endpoint = EpOf(0), EndpointText = EpOf(0).ToString() };
            pc.Allowed.Add(IpPrefix.Parse("100.64.0.250/32"));
            cfg.Peers.Add(pc);
            t.AddNode(KeyOf(i), cfg, EpOf(i), $"100.64.{i / 250}.{i % 250 + 1}");
        }
        t.Start();
        int Up() => hub.Node.Peers.Count(p => p.Active && p.Up);
        long ms = t.AdvanceUntil(() => Up() == n, 120_000, 250);
        Assert.True(ms >= 0, $"{Up()} of {n} peers up after 120 s (simulated); refused for max_sessions: {hub.Node.Admission.RefusedSessions}");
        var sw = System.Diagnostics.Stopwatch.StartNew();
        t.Advance(250_000, 1_000);                            // two rekeys, keepalives every 25 s
        Assert.Equal(n, Up());
        Assert.Equal(0, hub.Node.Admission.RefusedSessions);
        Assert.Equal(n, hub.Node.Peers.Count(p => p.Active && p.HasReadySession(t.NowMs, Spec.RejectAfterTimeMs)));
        output.WriteLine($"{n} peers up after {ms} ms simulated; the hub's config and peer table: {hubBytes / n} managed bytes per peer; " +
                         $"250 simulated seconds of rekeys and keepalives for all {n + 1} nodes took {sw.ElapsedMilliseconds} ms of this process");
    }
}
