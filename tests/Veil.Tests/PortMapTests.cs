using System.Net;

namespace Veil.Tests;

/// <summary>The port-mapping protocols' messages (PortMapper, §14): NAT-PMP (RFC 6886), PCP (RFC 6887)
/// and UPnP IGD text, byte by byte against the RFCs' layouts; the live exchange with miniupnpd is
/// tests/netns/portmap.sh.</summary>
public class PortMapTests
{
    private static byte[] Hex(string h) => Convert.FromHexString(h.Replace(" ", ""));

    [Fact]
    public void NatPmp_MapRequest_GoldenBytes()
    {
        byte[] d = new byte[12];
        NatPmp.WriteMap(d, 51820, 51820, 7200);
        Assert.Equal(Hex("00 01 0000 ca6c ca6c 00001c20"), d);
        NatPmp.WriteMap(d, 51820, 0, 0);                                   // delete
        Assert.Equal(Hex("00 01 0000 ca6c 0000 00000000"), d);
    }

    [Fact]
    public void NatPmp_Answers_ParsedAndBoundsChecked()
    {
        Assert.True(NatPmp.TryParseAddress(Hex("00 80 0000 00000e10 c0000202"), out IPAddress? ext, out int result));
        Assert.Equal((IPAddress.Parse("192.0.2.2"), 0), (ext, result));
        Assert.True(NatPmp.TryParseMap(Hex("00 81 0000 00000e10 ca6c ca6d 00001c20"), out ushort port, out uint life, out result));
        Assert.Equal((51821, 7200u, 0), (port, life, result));
        Assert.True(NatPmp.TryParseMap(Hex("00 81 0002 00000e10 ca6c 0000 00000000"), out _, out _, out result));
        Assert.Equal(2, result);                                           // not authorized
        Assert.Equal("not authorized", NatPmp.ResultName(result));
        foreach (string bad in new[] { "", "00", "00 81 0000", "00 81 0000 00000e10 ca6c ca6d 00001c", "01 81 0000 00000e10 ca6c ca6d 00001c20",
                                       "00 82 0000 00000e10 ca6c ca6d 00001c20", "00 81 0000 00000e10 ca6c 0000 00001c20", "00 81 0000 00000e10 ca6c ca6d 00001c20 00" })
            Assert.False(NatPmp.TryParseMap(Hex(bad), out _, out _, out _), bad);
        Assert.False(NatPmp.TryParseAddress(Hex("00 80 0000 00000e10 c00002"), out _, out _));
    }

    private static readonly byte[] Nonce = Hex("0102030405060708090a0b0c");

    [Fact]
    public void Pcp_MapRequest_GoldenBytes()
    {
        byte[] d = new byte[Pcp.MapLen];
        Pcp.WriteMap(d, IPAddress.Parse("198.51.100.2"), Nonce, 51820, 51820, 7200);
        Assert.Equal(Hex("02 01 0000 00001c20 00000000000000000000ffff c6336402" +             // header: version, MAP, lifetime, client
                         "0102030405060708090a0b0c 11 000000 ca6c ca6c 00000000000000000000ffff 00000000"), d);   // MAP: nonce, UDP, ports, any v4
    }

    private static byte[] PcpAnswer(int result, string nonce = "0102030405060708090a0b0c", string ext = "00000000000000000000ffff c0000202", string port = "ca6c") =>
        Hex($"02 81 00 {result:x2} 00001c20 0000002a 000000000000000000000000 {nonce} 11 000000 ca6c {port} {ext}");

    [Fact]
    public void Pcp_Answers_ParsedNonceCheckedBoundsChecked()
    {
        Assert.True(Pcp.TryParseMap(PcpAnswer(0), Nonce, out Endpoint ext, out uint life, out int result));
        Assert.Equal((Endpoint.FromIp(IPAddress.Parse("192.0.2.2"), 51820), 7200u, 0), (ext, life, result));
        Assert.True(Pcp.TryParseMap(PcpAnswer(8), Nonce, out _, out _, out result));
        Assert.Equal("no resources", Pcp.ResultName(result));
        Assert.False(Pcp.TryParseMap(PcpAnswer(0, nonce: "ffffffffffffffffffffffff"), Nonce, out _, out _, out _));   // not ours
        Assert.False(Pcp.TryParseMap(PcpAnswer(0, ext: "20010db8000000000000000000000001"), Nonce, out _, out _, out _));   // v6 for a v4 map
        Assert.False(Pcp.TryParseMap(PcpAnswer(0, port: "0000"), Nonce, out _, out _, out _));
        byte[] ok = PcpAnswer(0);
        Assert.False(Pcp.TryParseMap(ok[..^1], Nonce, out _, out _, out _));
        Assert.False(Pcp.TryParseMap([.. ok, 0], Nonce, out _, out _, out _));
        ok[1] = 0x01;                                                      // a request, not an answer
        Assert.False(Pcp.TryParseMap(ok, Nonce, out _, out _, out _));
    }

    [Fact]
    public void DefaultGateway_FromProcNetRoute_LowestMetricDefaultWithGatewayFlag()
    {
        const string routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n" +
                              "eth0\t00000000\t0202000A\t0003\t0\t0\t600\t00000000\t0\t0\t0\n" +
                              "wlan0\t00000000\t016433C6\t0003\t0\t0\t100\t00000000\t0\t0\t0\n" +
                              "eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n" +
                              "tun0\t00000000\t00000000\t0001\t0\t0\t50\t00000000\t0\t0\t0\n";   // a default with no gateway (a TUN)
        Assert.Equal(IPAddress.Parse("198.51.100.1"), PortMapper.DefaultGateway(routes));
        Assert.Null(PortMapper.DefaultGateway("Iface\tDestination\tGateway\n"));
        Assert.Null(PortMapper.DefaultGateway("eth0\t00000000\t0202000A\t0001\t0\t0\t0\t00000000\t0\t0\t0\n"));   // not RTF_GATEWAY
        Assert.Null(PortMapper.DefaultGateway("garbage\nmore garbage\t\t\n"));
    }

    [Fact]
    public void Upnp_SsdpLocation_Description_Soap()
    {
        Assert.Equal("http://198.51.100.1:5000/rootDesc.xml",
            Upnp.Location("HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nLocation: http://198.51.100.1:5000/rootDesc.xml\r\n\r\n"));
        Assert.Null(Upnp.Location("NOTIFY * HTTP/1.1\r\nLOCATION: http://198.51.100.1:5000/rootDesc.xml\r\n\r\n"));
        Assert.Null(Upnp.Location("HTTP/1.1 200 OK\r\nST: x\r\n\r\n"));

        IPAddress gw = IPAddress.Parse("198.51.100.1");
        Assert.NotNull(Upnp.GatewayUrl("http://198.51.100.1:5000/rootDesc.xml", gw));
        Assert.Null(Upnp.GatewayUrl("http://198.51.100.9:5000/rootDesc.xml", gw));           // another host: never asked
        Assert.Null(Upnp.GatewayUrl("https://198.51.100.1/rootDesc.xml", gw));
        Assert.Null(Upnp.GatewayUrl("http://router.example/rootDesc.xml", gw));
        Assert.Null(Upnp.GatewayUrl("/rootDesc.xml", gw));
        Assert.Equal(new HttpUrl("198.51.100.1", 80, "/"), Upnp.GatewayUrl("HTTP://198.51.100.1", gw));
        Assert.Equal(new HttpUrl("198.51.100.1", 5000, "/d?x=1"), Upnp.GatewayUrl("http://198.51.100.1:5000/d?x=1#frag", gw));
        foreach (string bad in new[] { "http://198.51.100.1:0/", "http://198.51.100.1:65536/", "http://198.51.100.1:/", "http://198.51.100.1:0005000/",
                                       "http://3325256705/", "http://198.51.100.1 /", "http://user@198.51.100.1/", "http://198.51.100.1/a b",
                                       "http://198.51.100.1/a\r\nHost: evil", "http://198.51.100.1/\u00e9", "http://[::1]/" })
            Assert.Null(Upnp.GatewayUrl(bad, gw));
        var desc = new HttpUrl("198.51.100.1", 5000, "/dev/rootDesc.xml?v=2");
        Assert.Equal("http://198.51.100.1:5000/ctl/IPConn", desc.Resolve(" /ctl/IPConn "));
        Assert.Equal("http://198.51.100.1:5000/dev/ctl", desc.Resolve("ctl"));
        Assert.Equal("http://198.51.100.9:80/x", desc.Resolve("http://198.51.100.9:80/x"));
        Assert.Null(Upnp.GatewayUrl(desc.Resolve("http://198.51.100.9:80/x"), gw));          // a control URL off the gateway is refused too
        Assert.Equal("http://198.51.100.1:5000/dev/rootDesc.xml?v=2", desc.ToString());

        const string xml = "<root><device><serviceList><service><serviceType>urn:schemas-upnp-org:service:Layer3Forwarding:1</serviceType>" +
                           "<controlURL>/ctl/L3F</controlURL></service></serviceList><deviceList><device><serviceList><service>" +
                           "<serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType><serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>" +
                           "<controlURL>/ctl/IPConn</controlURL><eventSubURL>/evt/IPConn</eventSubURL></service></serviceList></device></deviceList></device></root>";
        Assert.Equal(("urn:schemas-upnp-org:service:WANIPConnection:1", "/ctl/IPConn"), Upnp.FindWanService(xml));
        Assert.Null(Upnp.FindWanService(xml.Replace("WANIPConnection", "WANFooConnection")));
        Assert.Null(Upnp.FindWanService("<serviceType>urn:schemas-upnp-org:service:WANIPConnection:1</serviceType><SCPDURL>/x</SCPDURL></service>"));

        string body = Upnp.SoapBody("urn:schemas-upnp-org:service:WANIPConnection:1", "AddPortMapping", [("NewRemoteHost", ""), ("NewPortMappingDescription", "a<b")]);
        Assert.Contains("<u:AddPortMapping xmlns:u=\"urn:schemas-upnp-org:service:WANIPConnection:1\"><NewRemoteHost></NewRemoteHost>" +
                        "<NewPortMappingDescription>a&lt;b</NewPortMappingDescription></u:AddPortMapping>", body);
        const string answer = "HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\n\r\n<s:Envelope><s:Body><u:GetExternalIPAddressResponse>" +
                              "<NewExternalIPAddress>192.0.2.2</NewExternalIPAddress></u:GetExternalIPAddressResponse></s:Body></s:Envelope>";
        Assert.Equal((200, answer[(answer.IndexOf("\r\n\r\n") + 4)..]), Upnp.ParseHttp(answer));
        Assert.Equal("192.0.2.2", Upnp.SoapValue(answer, "NewExternalIPAddress"));
        Assert.Equal("718", Upnp.SoapValue("<s:Fault><detail><UPnPError><errorCode>718</errorCode></UPnPError></detail></s:Fault>", "errorCode"));
        Assert.Null(Upnp.SoapValue("<NewExternalIPAddressX>1</NewExternalIPAddressX>", "NewExternalIPAddress"));
        Assert.Null(Upnp.ParseHttp("garbage"));
        Assert.Null(Upnp.ParseHttp("HTTP/1.1 200 OK\r\nno end of headers"));
    }

    [Fact]
    public void Protocols_DefaultOrder_AndEnvNarrowsIt()
    {
        Assert.Equal(["pcp", "nat-pmp", "upnp"], PortMapper.Protocols(null));
        Assert.Equal(["upnp"], PortMapper.Protocols("upnp"));
        Assert.Equal(["nat-pmp", "upnp"], PortMapper.Protocols(" nat-pmp , upnp "));
    }
}
