using System.Net;

namespace Veil.Tests;

/// <summary>Golden bytes of the peer-exchange messages (README "Peer exchange"): a change of the
/// encoding breaks these on purpose.</summary>
public class ExchangeWireTests
{
    private static Endpoint Ep(string ip, int port) => Endpoint.FromIp(IPAddress.Parse(ip), port);

    [Fact]
    public void Self_GoldenBytes()
    {
        var endpoints = new List<Endpoint> { Ep("192.0.2.3", 51820), Ep("2001:db8::3", 51820) };
        var claims = new List<Claim> { new(IpPrefix.Parse("100.64.0.3/32"), 100), new(IpPrefix.Parse("203.0.113.0/24"), 10) };
        byte[] buf = new byte[Tune.MaxExchangeLen];
        int n = ExchangeMessage.WriteSelf(buf, "gw-c", Ep("198.51.100.7", 4500), endpoints, claims, ExchangeMessage.SelfRelays);
        string hex = Convert.ToHexString(buf, 0, n).ToLowerInvariant();
        Assert.Equal(
            "01" + "04" + "67772d63" +                                  // Self, name "gw-c"
            "04" + "c6336407" + "1194" +                                // observed 198.51.100.7:4500
            "02" + "04" + "c0000203" + "ca6c" +                         // 2 endpoints: 192.0.2.3:51820
            "06" + "20010db8000000000000000000000003" + "ca6c" +        //   [2001:db8::3]:51820
            "02" + "04" + "20" + "64400003" + "0064" +                  // 2 claims: 100.64.0.3/32 metric 100
            "04" + "18" + "cb007100" + "000a" +                         //   203.0.113.0/24 metric 10
            "01",                                                       // flags: relays for members
            hex);
        var m = new ExchangeMessage();
        Assert.True(m.Parse(buf.AsSpan(0, n)));
        Assert.Equal(ExchangeMessage.TypeSelf, m.Type);
        Assert.Equal("gw-c", m.Name);
        Assert.Equal(Ep("198.51.100.7", 4500), m.Observed);
        Assert.Equal(endpoints, m.Endpoints);
        Assert.Equal(claims, m.Claims);
        Assert.Equal(ExchangeMessage.SelfRelays, m.SelfFlags);
        Assert.True(m.Parse(buf.AsSpan(0, n - 1)));                      // an older node's Self: no flags byte
        Assert.Equal(0, m.SelfFlags);
        Assert.Equal(claims, m.Claims);
    }

    [Fact]
    public void Punch_GoldenBytes()
    {
        var endpoints = new List<Endpoint> { Ep("192.0.2.2", 51820), Ep("198.51.100.2", 51820) };
        byte[] buf = new byte[Tune.MaxExchangeLen];
        int n = ExchangeMessage.WritePunch(buf, endpoints);
        Assert.Equal("04" + "02" + "04" + "c0000202" + "ca6c" + "04" + "c6336402" + "ca6c", Convert.ToHexString(buf, 0, n).ToLowerInvariant());
        var m = new ExchangeMessage();
        Assert.True(m.Parse(buf.AsSpan(0, n)));
        Assert.Equal(ExchangeMessage.TypePunch, m.Type);
        Assert.Equal(endpoints, m.Endpoints);
        Assert.False(m.Parse([ExchangeMessage.TypePunch, 0]));            // no endpoint: malformed
        Assert.False(m.Parse(buf.AsSpan(0, n - 1)));                      // cut short
        byte[] extra = [.. buf.AsSpan(0, n), 0];
        Assert.False(m.Parse(extra));                                     // a byte too many
    }

    [Fact]
    public void PingPong_GoldenBytes()
    {
        byte[] buf = new byte[16];
        int n = ExchangeMessage.WritePing(buf, ExchangeMessage.TypePing, 0x0102030405060708);
        Assert.Equal("050102030405060708", Convert.ToHexString(buf, 0, n).ToLowerInvariant());
        var m = new ExchangeMessage();
        Assert.True(m.Parse(buf.AsSpan(0, n)));
        Assert.Equal((ExchangeMessage.TypePing, 0x0102030405060708UL), (m.Type, m.PingId));
        n = ExchangeMessage.WritePing(buf, ExchangeMessage.TypePong, ulong.MaxValue);
        Assert.Equal("06ffffffffffffffff", Convert.ToHexString(buf, 0, n).ToLowerInvariant());
        Assert.True(m.Parse(buf.AsSpan(0, n)));
        Assert.Equal((ExchangeMessage.TypePong, ulong.MaxValue), (m.Type, m.PingId));
    }

    [Fact]
    public void Members_GoldenBytes()
    {
        Key32 key = default;
        for (int i = 0; i < 32; i++) key[i] = (byte)i;
        byte[] buf = new byte[Tune.MaxExchangeLen];
        buf[0] = ExchangeMessage.TypeMembers;
        buf[1] = 1;
        int n = 2 + ExchangeMessage.WriteEntry(buf.AsSpan(2), key, 75, new List<Endpoint> { Ep("192.0.2.9", 51820) });
        Assert.Equal(
            "02" + "01" + "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f" + "0000004b" + "01" + "04" + "c0000209" + "ca6c",
            Convert.ToHexString(buf, 0, n).ToLowerInvariant());
        var m = new ExchangeMessage();
        Assert.True(m.Parse(buf.AsSpan(0, n)));
        var (k, ago, first, count) = Assert.Single(m.Members);
        Assert.True(k.EqualsCt(key));
        Assert.Equal(75u, ago);
        Assert.Equal(1, count);
        Assert.Equal(Ep("192.0.2.9", 51820), m.MemberEndpoints[first]);
    }
}
