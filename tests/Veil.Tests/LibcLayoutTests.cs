using System.Net;
using System.Runtime.InteropServices;

namespace Veil.Tests;

public class LibcLayoutTests
{
    [Fact]
    public void EpollEvent_PackedOnlyOnX86()
    {
        bool x86 = RuntimeInformation.ProcessArchitecture is Architecture.X64 or Architecture.X86;
        Assert.Equal(x86 ? 12 : 16, Libc.EpollEventLen);
        Assert.Equal(x86 ? 4 : 8, Libc.EpollDataOffset);
    }

    [Fact]
    public void Sockaddr_In4And6_LayoutAndRoundTrip()
    {
        var ep4 = Endpoint.FromIp(IPAddress.Parse("198.51.100.7"), 51820);
        byte[] sa = new byte[Libc.SockaddrIn6Len];
        Assert.Equal(16, Libc.WriteSockaddr(ep4, false, sa));
        Assert.Equal(new byte[] { 2, 0, 0xCA, 0x6C, 198, 51, 100, 7 }, sa[..8]);   // family host order, port network order
        Assert.True(Libc.TryReadSockaddr(sa, 16, out Endpoint back4));
        Assert.Equal(ep4, back4);
        var ep6 = Endpoint.FromIp(IPAddress.Parse("2001:db8::9"), 443);
        Assert.Equal(28, Libc.WriteSockaddr(ep6, true, sa));
        Assert.Equal(new byte[] { 10, 0, 0x01, 0xBB }, sa[..4]);
        Assert.Equal(IPAddress.Parse("2001:db8::9").GetAddressBytes(), sa[8..24]);
        Assert.True(Libc.TryReadSockaddr(sa, 28, out Endpoint back6));
        Assert.Equal(ep6, back6);
        // an IPv4 peer on a dual-stack socket is written as ::ffff:a.b.c.d
        Libc.WriteSockaddr(ep4, true, sa);
        Assert.Equal(IPAddress.Parse("::ffff:198.51.100.7").GetAddressBytes(), sa[8..24]);
        Assert.False(Libc.TryReadSockaddr(sa, 3, out _));
    }

    [Fact]
    public unsafe void MsgHdr_And_MMsgHdr_MatchTheKernelLayout()
    {
        // struct msghdr: 7 fields, pointer-sized but for two ints padded to pointer size: 56 bytes on
        // 64-bit, 28 on 32-bit; struct mmsghdr adds msg_len (unsigned int), padded to pointer size.
        Assert.Equal(7 * IntPtr.Size, sizeof(MsgHdr));
        Assert.Equal(IntPtr.Size == 8 ? 64 : 32, sizeof(MMsgHdr));
        Assert.Equal(2 * IntPtr.Size, sizeof(IoVec));
    }

    [Fact]
    public void IfReq_SizesAreTheLargestOfAllArchitectures()
    {
        Assert.Equal(40, Libc.IfReqLen);
        Assert.Equal(16, Libc.IfReqFlagsOffset);
        Assert.Equal(16, Libc.IfNameSize);
    }

    [Fact]
    public void Ioctl_TunSetIff_AsmGenericEncoding()
    {
        // _IOW('T', 202, int): dir write (1) << 30 | size 4 << 16 | 'T' << 8 | 202
        Assert.Equal((1u << 30) | (4u << 16) | ((uint)'T' << 8) | 202u, Libc.TUNSETIFF);
    }
}

public class PathMtuTests
{
    // A host check: this machine has what the fast path needs (skip elsewhere: Category!=Host).
    [Fact]
    [Trait("Category", "Host")]
    public void PathMtu_Loopback_IsTheLoopbackMtu()
    {
        int expect = Math.Min(65535, int.Parse(File.ReadAllText("/sys/class/net/lo/mtu").Trim()));   // IP_MTU caps at the IP maximum
        Assert.Equal(expect, Libc.PathMtu(Endpoint.FromIp(System.Net.IPAddress.Loopback, 9)));
    }

    [Fact]
    public void DefaultMtu_1500Underlay_1420OverIPv4_1400OverIPv6()
    {
        Assert.Equal(1420, UpConfig.DefaultMtu(1500, false));
        Assert.Equal(1400, UpConfig.DefaultMtu(1500, true));
        // the largest record still fits: inner + padding to 16 (capped at the MTU) + header + tag + IP/UDP
        int inner = UpConfig.DefaultMtu(1500, true);
        Assert.True(Record.PaddedLen(inner, inner) + Record.OverheadLen + 48 <= 1500);
    }
}
