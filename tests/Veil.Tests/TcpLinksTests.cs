using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;

namespace Veil.Tests;

/// <summary>TcpLinks (§13): datagrams framed by their own preamble over TCP on loopback, links that
/// stand in for endpoints, and what a bad or silent client gets. Each side has its own epoll set,
/// pumped by hand.</summary>
public unsafe class TcpLinksTests : IDisposable
{
    private readonly int _serverEp = Libc.EpollCreate1(Libc.EPOLL_CLOEXEC), _clientEp = Libc.EpollCreate1(Libc.EPOLL_CLOEXEC);
    private readonly TcpLinks _server, _client;
    private readonly List<(byte[] Data, Endpoint From)> _atServer = new(), _atClient = new();

    public TcpLinksTests()
    {
        _server = new TcpLinks(_serverEp);
        _server.Listen(IPAddress.Loopback, 0);
        _client = new TcpLinks(_clientEp);
    }

    public void Dispose()
    {
        _server.Dispose();
        _client.Dispose();
        Libc.Close(_serverEp);
        Libc.Close(_clientEp);
    }

    private Endpoint ServerAddress => Endpoint.FromIp(IPAddress.Loopback, _server.ListenPort);

    // A datagram as the node sends them: 17 03 03, the length of the rest, then the rest.
    private static byte[] Datagram(int bodyLen, byte fill)
    {
        byte[] d = new byte[5 + bodyLen];
        d[0] = 0x17; d[1] = 3; d[2] = 3;
        BinaryPrimitives.WriteUInt16BigEndian(d.AsSpan(3), (ushort)bodyLen);
        d.AsSpan(5).Fill(fill);
        return d;
    }

    // Runs both epoll sets until nothing is ready for 50 ms (bounded).
    private void Pump(long nowMs = 0)
    {
        byte* events = stackalloc byte[16 * 16];
        for (int idle = 0, round = 0; idle < 5 && round < 1000; round++)
        {
            int any = 0;
            foreach (var (ep, links, got) in new[] { (_serverEp, _server, _atServer), (_clientEp, _client, _atClient) })
            {
                int n = Libc.EpollWait(ep, events, 16, 5);
                for (int i = 0; i < n; i++)
                    links.OnReady(Libc.EpollEventFd(events, i), nowMs, (d, from) => got.Add((d.ToArray(), from)));
                any += Math.Max(n, 0);
            }
            idle = any == 0 ? idle + 1 : 0;
        }
    }

    [Fact]
    public void Datagrams_CrossBothWays_FramedByTheirPreamble_EvenWhenSplitOrJoined()
    {
        Endpoint link = _client.Connect(ServerAddress, 0);
        Assert.True(TcpLinks.IsTcp(link));
        Assert.False(TcpLinks.IsTcp(ServerAddress));
        byte[] a = Datagram(100, 1), b = Datagram(1400, 2), c = Datagram(0, 3);
        Assert.True(_client.Send(link, a));                      // queued while connecting
        Assert.True(_client.Send(link, b));
        Assert.True(_client.Send(link, c));
        Pump();
        Assert.Equal(3, _atServer.Count);
        Assert.Equal(a, _atServer[0].Data);
        Assert.Equal(b, _atServer[1].Data);
        Assert.Equal(c, _atServer[2].Data);
        Endpoint back = _atServer[0].From;
        Assert.True(TcpLinks.IsTcp(back));
        Assert.Equal(1, _server.Accepted);
        Assert.True(_server.RemoteOf(back).IsSet);
        Assert.Equal(ServerAddress, _client.RemoteOf(link));

        byte[] big = Datagram(9000, 4);                          // a jumbo record: one frame, many segments
        Assert.True(_server.Send(back, big));
        Assert.True(_server.Send(back, a));
        Pump();
        Assert.Equal(2, _atClient.Count);
        Assert.Equal(big, _atClient[0].Data);
        Assert.Equal(link, _atClient[0].From);
    }

    private Socket RawClient()
    {
        var s = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        s.Connect(IPAddress.Loopback, _server.ListenPort);
        return s;
    }

    [Theory]
    [InlineData("16 03 01 00 05")]       // not 03 03 after the type
    [InlineData("17 03 03 ff ff")]       // longer than any record
    [InlineData("47 45 54 20 2f")]       // "GET /": someone's HTTP client
    public void MalformedFrame_ClosesThatLinkOnly_Counted(string head)
    {
        Endpoint good = _client.Connect(ServerAddress, 0);
        _client.Send(good, Datagram(10, 1));
        Pump();
        using Socket raw = RawClient();
        raw.Send([.. Convert.FromHexString(head.Replace(" ", "")), .. new byte[20]]);
        Pump();
        Assert.Equal(1, _server.Malformed);
        Assert.Equal(1, _server.Count);                          // the good link stays
        var gone = new List<Endpoint>();
        _server.Expire(0, gone);
        Assert.Single(gone);
        Assert.Single(_atServer);                                // nothing of the bad one was delivered
        raw.ReceiveTimeout = 1000;
        Assert.Equal(0, raw.Receive(new byte[16]));              // closed on it
    }

    [Fact]
    public void SilentClient_IsClosedAfterIdleTime_AndReported()
    {
        using Socket raw = RawClient();
        Pump(0);
        Assert.Equal(1, _server.Count);
        var gone = new List<Endpoint>();
        _server.Expire(29_000, gone);
        Assert.Empty(gone);
        _server.Expire(30_000, gone);
        Assert.Single(gone);
        Assert.Equal(0, _server.Count);
    }

    [Fact]
    public void FullTable_StrangersMakeRoom_MembersDoNot()
    {
        var raws = new List<Socket>();
        try
        {
            for (int i = 0; i < TcpLinks.MaxConnections + 3; i++)
            {
                raws.Add(RawClient());
                if (i % 8 == 7) Pump();                          // accept as we go: the backlog is bounded too
            }
            Pump();
            Assert.Equal(TcpLinks.MaxConnections, _server.Count);
            Assert.Equal(0, _server.Refused);
            Assert.Equal(3, _server.Closed);                     // the three oldest strangers made room
            foreach (Endpoint link in _server.Links()) _server.Touch(link, 0);   // now every link has brought a member's record
            raws.Add(RawClient());
            Pump();
            Assert.Equal(1, _server.Refused);
            Assert.Equal(3, _server.Closed);
        }
        finally { foreach (Socket s in raws) s.Dispose(); }
    }

    [Fact]
    public void AuthenticatedLink_OutlivesTheIdleTime_WhileTouched()
    {
        Endpoint link = _client.Connect(ServerAddress, 0);
        _client.Send(link, Datagram(10, 1));
        Pump();
        Endpoint back = Assert.Single(_atServer).From;
        var gone = new List<Endpoint>();
        _server.Touch(back, 25_000);
        _server.Expire(50_000, gone);
        Assert.Empty(gone);
        _server.Expire(55_000, gone);
        Assert.Equal([back], gone);
    }

    [Fact]
    public void TcpStandIns_NeverParseFromTheWire()
    {
        // A member that names 100::/64 (our links' stand-ins) as an endpoint sends a malformed message.
        byte[] self = [ExchangeMessage.TypeSelf, 1, (byte)'m', 6, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 7, 0, 0];
        Assert.False(new ExchangeMessage().Parse(self));
        self[5] = 0x01;                                          // 101:: is an ordinary address
        Assert.True(new ExchangeMessage().Parse(self));
    }
}
