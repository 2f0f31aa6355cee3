using System.Net;

namespace Veil.Tests;

/// <summary>§10 Admission: the per-source and global handshake budgets, the source table bound, cookies under load.</summary>
public class AdmissionTests
{
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
}
