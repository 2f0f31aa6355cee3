using System.Net;
using System.Net.Sockets;
using System.Text;

namespace Veil.Tests;

/// <summary>§17 RequestServer, through the management endpoint on a real loopback socket and a
/// real epoll: every connection a bounded state machine with deadlines, never blocking the loop.</summary>
public sealed unsafe class RequestServerTests : IDisposable
{
    private readonly int _epfd = Libc.EpollCreate1(Libc.EPOLL_CLOEXEC);
    private readonly TestNet _t = TestNet.FullMesh(2);
    private readonly StatusView _status;
    private readonly List<Socket> _clients = new();
    private long _nowMs = 1_000_000;

    public RequestServerTests() => _status = new StatusView(_t.Nodes[0].Node, new UpConfig { Mtu = 1420 }, 51820, _t.NowMs, () => _t.NowMs);

    public void Dispose()
    {
        foreach (Socket c in _clients) c.Dispose();
        Libc.Close(_epfd);
    }

    private MgmtServer Listen(params string[] acl) =>
        MgmtServer.Listen(IPAddress.Loopback, 0, _epfd, acl.Length == 0 ? [IpPrefix.Parse("127.0.0.0/8")] : acl.Select(IpPrefix.Parse).ToList());

    private Socket Connect(MgmtServer server)
    {
        var c = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { ReceiveTimeout = 5_000 };
        c.Connect(IPAddress.Loopback, server.Port);
        _clients.Add(c);
        return c;
    }

    // What the daemon's loop does: wait on epoll, hand each ready fd to the server.
    private void Pump(MgmtServer server, int rounds = 20)
    {
        byte* events = stackalloc byte[16 * 16];
        for (int r = 0; r < rounds; r++)
        {
            int n = Libc.EpollWait(_epfd, events, 16, 20);
            for (int i = 0; i < n; i++) server.OnReady(Libc.EpollEventFd(events, i), _nowMs, _status);
        }
    }

    private static string Read(Socket c)
    {
        var all = new MemoryStream();
        byte[] buf = new byte[65536];
        try { int n; while ((n = c.Receive(buf)) > 0) all.Write(buf, 0, n); }
        catch (SocketException) { }
        return Encoding.ASCII.GetString(all.ToArray());
    }

    private string Ask(MgmtServer server, string request)
    {
        Socket c = Connect(server);
        c.Send(Encoding.ASCII.GetBytes(request));
        Pump(server);
        return Read(c);
    }

    [Fact]
    public void Requests_AnsweredByPathAndMethod()
    {
        using MgmtServer server = Listen();
        Assert.StartsWith("HTTP/1.1 200", Ask(server, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"));
        string status = Ask(server, "GET /status HTTP/1.1\r\n\r\n");
        Assert.StartsWith("HTTP/1.1 200", status);
        Assert.Contains("\"public_key\"", status);
        Assert.Contains("veil_build_info", Ask(server, "GET /metrics?x=1 HTTP/1.1\r\n\r\n"));
        Assert.StartsWith("HTTP/1.1 404", Ask(server, "GET /nope HTTP/1.1\r\n\r\n"));
        Assert.StartsWith("HTTP/1.1 405", Ask(server, "POST /status HTTP/1.1\r\n\r\n"));
        Assert.StartsWith("HTTP/1.1 400", Ask(server, "hello\r\n\r\n"));
    }

    [Fact]
    public void StatusPage_SelfContained_CspHashesItsOwnScriptAndStyle()
    {
        using MgmtServer server = Listen();
        string r = Ask(server, "GET / HTTP/1.1\r\n\r\n");
        int split = r.IndexOf("\r\n\r\n", StringComparison.Ordinal);
        string head = r[..split], body = r[(split + 4)..];
        Assert.StartsWith("HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n", head);
        Assert.Contains("\r\nX-Content-Type-Options: nosniff", head);
        Assert.Contains("\r\nContent-Security-Policy: " + MgmtServer.Csp(body), head);
        Assert.Contains("script-src 'sha256-", head);
        Assert.True(Encoding.UTF8.GetByteCount(body) <= 8192, $"{body.Length} bytes");
        Assert.DoesNotContain("http://", body);
        Assert.DoesNotContain("https://", body);
        Assert.Single(System.Text.RegularExpressions.Regex.Matches(body, "<script>"));
        Assert.Single(System.Text.RegularExpressions.Regex.Matches(body, "<style>"));
        Assert.DoesNotMatch(@"\s(on[a-z]+|style)=", body);                // the CSP would refuse inline handlers and styles
        Assert.Contains("fetch(\"/status\"", body);
    }

    [Fact]
    public void Head_SameHeadNoBody()
    {
        using MgmtServer server = Listen();
        string get = Ask(server, "GET /healthz HTTP/1.1\r\n\r\n"), head = Ask(server, "HEAD /healthz HTTP/1.1\r\n\r\n");
        Assert.EndsWith("\r\n\r\nok\n", get);
        Assert.Equal(get[..^"ok\n".Length], head);                  // Content-Length: 3 kept, the body left out
        Assert.Contains("Content-Length: 3\r\n", head);
    }

    [Fact]
    public void SourceOutsideAcl_Forbidden()
    {
        using MgmtServer server = Listen("192.0.2.0/24");
        Assert.StartsWith("HTTP/1.1 403", Ask(server, "GET /status HTTP/1.1\r\n\r\n"));
    }

    [Fact]
    public void HugeHeader_431_SilentClient_408AtItsDeadline()
    {
        using MgmtServer server = Listen();
        Assert.StartsWith("HTTP/1.1 431", Ask(server, "GET /status HTTP/1.1\r\nX: " + new string('a', 9000) + "\r\n\r\n"));
        Socket silent = Connect(server);
        silent.Send("GET /sta"u8.ToArray());
        Pump(server);
        Assert.True(server.NextDeadlineMs > _nowMs);
        _nowMs = server.NextDeadlineMs;                                // the read deadline passes
        server.Expire(_nowMs);
        Assert.StartsWith("HTTP/1.1 408", Read(silent));
        Assert.Equal(long.MaxValue, server.NextDeadlineMs);             // nothing left open
    }

    // A full table makes room by ending the client that has been sending its request the longest;
    // the newcomer is served. Idle clients cannot keep the endpoint closed.
    [Fact]
    public void FullTable_OldestSenderMakesRoom_NewClientServed()
    {
        using MgmtServer server = Listen();
        var idle = new List<Socket>();
        for (int i = 0; i < 16; i++)
        {
            idle.Add(Connect(server));
            Pump(server, 2);
            _nowMs += 10;                                               // each a little later than the one before
        }
        Assert.StartsWith("HTTP/1.1 200", Ask(server, "GET /healthz HTTP/1.1\r\n\r\n"));
        idle[0].ReceiveTimeout = 2_000;
        Assert.Equal(0, idle[0].Receive(new byte[16]));                 // the oldest was closed, without an answer
        idle[15].ReceiveTimeout = 200;
        Assert.Throws<SocketException>(() => idle[15].Receive(new byte[16]));   // the newest is still waiting
    }
}
