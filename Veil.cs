// Veil — a mesh VPN daemon for Linux routers and small boards, in one file.
// SPDX-License-Identifier: MIT
//
// Veil joins nodes into an encrypted layer-3 overlay over UDP. Nodes authenticate each other with
// the Noise IKpsk2 handshake over X25519 (hand-rolled below, .NET has none), carry IP packets in
// records that look like TLS application data, reject replays with a sliding window, rotate keys
// every 120 s, and pick the peer for a packet by longest-prefix match on its destination. README.md
// is the user's manual and the wire specification; this header is the programmer's.
//
// How the file reads: top to bottom in three parts.
//   A. Foundations (§1–6): entry point, constants, diagnostics, config, libc, crypto. Each calls
//      only sections above it.
//   B. The packet path (§7–13), in the order an outbound packet travels:
//      TUN -> route -> peer -> handshake/keys -> record -> UDP. Read it bottom-up for inbound. These
//      sections never read the clock (they take nowMs) and do I/O only through §7 and §13.
//   C. Drivers (§14–19): the node and its event loop, the mesh, NAT traversal, control and
//      management, CLI, onboarding.
// Where to start: Node.ProcessTunBatch (a packet from the TUN to the wire) and
// Node.ProcessUdpBatch (a datagram to the TUN), both in §14; Daemon.Run for what happens at start-up
// and around the loop; Handshaker (§10) and Record (§12) for the protocol.
//
// Threads and locks. The first worker's thread runs the epoll loop: the TUN and UDP of its worker,
// the timers, signals, the control socket and the management endpoint (served without blocking,
// RequestServer in §17). With --workers N > 1, N-1 more threads each own a TUN queue and a
// SO_REUSEPORT socket. Reading, writing, segmenting and coalescing run in parallel; everything that
// touches the node (routes, peers, sessions, counters) runs under its lock (node.Gate), so Node is
// single-threaded code. Only the loop runs the timers; a worker that arms one earlier than the
// loop's next wake-up, or changes routes, peers or joiners, wakes it through an eventfd
// (LoopSignal). Four more threads never touch the node: the resolver (peers' DNS names), the
// chores (parsing the config file, writing a joiner with fsync, listing NICs, netlink route sync:
// each hands the loop a finished value to apply under the lock), the port mapper (asking the
// gateway to forward our port; its result goes through the chores' queue), and the log writer (lines are
// queued, so a slow reader of stderr stalls nobody). No slow work, and no I/O but the packets'
// own, happens under the node's lock. Lock order: node, then the log's budget lock, then its
// writing lock; nothing takes the node's lock while holding another.
//
// Environment knobs (for tests and for users chasing a problem; none is needed in normal use):
//   VEIL_OFFLOADS=off   plain TUN and one datagram per send/receive, as on a kernel without TSO,
//                       USO, UDP GSO/GRO (the fallback path, exercised by tests/netns/iperf.sh)
//   VEIL_AEAD_BCL=1     the .NET AEAD classes instead of direct libcrypto EVP calls (and of AesGcmNi)
//   VEIL_AEAD_NI=off    AES-GCM through libcrypto EVP, not AesGcmNi (to compare)
//   VEIL_PORTMAP=LIST   the port-mapping protocols to try, in order (pcp,nat-pmp,upnp by default;
//                       tests/netns/nat.sh narrows it to test each against miniupnpd)
//
// Rules that keep the file what it is (learned from WireGuard, wireguard-go and boringtun):
//   - The packet path allocates nothing in steady state: pooled pinned buffers, spans passed down,
//     no LINQ, closures, boxing or string formatting unless a log level wants it (a test counts
//     the bytes). It returns verdicts and bumps a DropReason counter; it never throws.
//   - Nothing an unauthenticated packet says changes state that matters: endpoints move only on
//     authenticated records, every table an outsider can fill is bounded.
//   - Secrets are compared with FixedTimeEquals and zeroed when dropped; keys are never logged.
//   - Units are in names (…Ms monotonic milliseconds, …Len bytes); seconds exist only in flags.
//     Protocol values live in Spec, this implementation's limits in Tune.
//   - No reflection, dynamic code or reflection-based JSON: the AOT build has zero warnings.
//   - Each section opens with prose: what it owns, what it may call, the spec it follows.
//
// TOC
//   1. Entry point & flags
//   2. Constants & basic types
//   3. Diagnostics
//   4. Config
//   5. libc interop
//   6. Crypto primitives
//   7. Dataplane: TUN & netlink
//   8. Routing trie
//   9. Peers & timers
//  10. Handshake & cookies
//  11. Sessions & replay window
//  12. Record layer
//  13. UDP socket
//  14. Event loop & node
//  15. Mesh: membership, peer exchange & claims
//  16. NAT traversal: relay, punching, port mapping & beacons
//  17. Control & management
//  18. CLI
//  19. Onboarding
// END TOC
//
// Glossary
//   ClientHello / ServerHello  the two Noise handshake messages (initiator -> responder -> initiator)
//   Bind                       the first transport record from the initiator; it confirms the keys
//   Session                    one pair of transport keys; a peer holds Previous, Current and Next
//   local / remote index       32-bit ids each side picks for a session; records carry the receiver's
//   Endpoint                   the UDP address a peer was last authenticated from
//   Route                      a prefix -> peer entry of the trie (cryptokey routing)
//
// Units: names end in Ms (monotonic milliseconds, long), Len (bytes), Bits or Offset. Seconds exist
// only in flags and become Ms when parsed.

using System;
using System.Buffers.Binary;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Net;
using System.Net.Sockets;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.InteropServices.Marshalling;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using X86Aes = System.Runtime.Intrinsics.X86.Aes;
using System.Security.Cryptography;
using System.Text;
using System.Threading;
using LineQueue = System.Collections.Concurrent.ConcurrentQueue<(System.IO.TextWriter To, string Line)>;

[assembly: InternalsVisibleTo("Veil.Tests")]
[assembly: DisableRuntimeMarshalling]
[assembly: System.Runtime.Versioning.SupportedOSPlatform("linux")]
[module: SkipLocalsInit]

namespace Veil;

// ==== 1. Entry point & flags =====================================================================
// Main only dispatches: each verb parses its own flags (§4 for `up`, §18 for the rest). Exit codes:
// 0 success, 1 a runtime failure (daemon unreachable, interface or socket could not be set up),
// 2 bad input. Errors are one line on stderr starting with "veil: ".

internal static class Program
{
    internal static int Main(string[] args)
    {
        TextWriter stdout = Console.Out, stderr = Console.Error;
        // A bare `veil` prints the overview: asking what a tool can do is not an error.
        string verb = args.Length > 0 ? args[0] : "help";
        switch (verb)
        {
            case "genkey": Cli.WarnIfOthersCanRead(stderr); return Cli.GenKey(stdout);
            case "pubkey": return Cli.PubKey(Console.In, stdout, stderr);
            case "genpsk": Cli.WarnIfOthersCanRead(stderr); return Cli.GenPsk(stdout);
            case "genadmin": Cli.WarnIfOthersCanRead(stderr); stdout.WriteLine(Convert.ToBase64String(AdminSignature.NewPrivateKey())); return 0;
            case "adminpub": return Cli.AdminPub(Console.In, stdout, stderr);
            case "up": return Up(args, stderr);
            case "init" or "invite" or "join" or "add-peer" or "doctor" or "service" or "revoke": return Onboard(verb, args, stdout, stderr);
            case "status" or "peers" or "routes" or "reload" or "down" or "netcheck" or "health" or "confirm" or "set": return Cli.Ask(verb, args, stdout, stderr);
            case "ping": return Cli.Ping(args, stdout, stderr);
            case "version" or "--version": stdout.WriteLine($"veil {Cli.Version} {RuntimeInformation.RuntimeIdentifier}"); return 0;
            case "bench": return Bench.Run(args, stdout);
            case "selftest": return SelfTest.Run(stdout);
            case "completion": return Cli.Completion(args.Length > 1 ? args[1] : "", stdout, stderr);
            case "help" or "--help" or "-h":
                if (Cli.Help(args.Length > 1 ? args[1] : null, stdout) == 0) return 0;
                stderr.WriteLine($"veil: no help for '{args[1]}'");
                return 2;
            default:
                stderr.WriteLine($"veil: unknown command '{verb}' (see 'veil help')");
                return 2;
        }
    }

    private static int Onboard(string verb, string[] args, TextWriter stdout, TextWriter stderr)
    {
        try
        {
            return verb switch
            {
                "init" => OnboardingCli.Init(args, stdout),
                "invite" => OnboardingCli.Invite(args, stdout, stderr),
                "join" => OnboardingCli.Join(args, stdout, stderr),
                "add-peer" => OnboardingCli.AddPeer(args, stdout),
                "service" => ServiceCli.Run(args, stdout),
                "revoke" => OnboardingCli.Revoke(args, stdout, stderr),
                _ => Doctor.Run(args, stdout),
            };
        }
        catch (ConfigException e) { stderr.WriteLine("veil: " + e.Message); return 2; }
        // The type, not e.Message: with UseSystemResourceKeys the runtime's messages are resource keys.
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or SocketException)
        {
            stderr.WriteLine($"veil: {verb}: {(e is UnauthorizedAccessException ? "permission denied" : "I/O error")} ({e.GetType().Name})");
            return 1;
        }
    }

    private static int Up(string[] args, TextWriter stderr)
    {
        List<UpConfig> all;
        try { all = UpConfig.LoadAll(args, 1); }
        catch (ConfigException e) { stderr.WriteLine("veil: " + e.Message); return 2; }
        UpConfig cfg = all[0];
        foreach (UpConfig n in all)
        {
            string of = n.NetworkName != null ? $"network {n.NetworkName}: " : "";
            foreach (PeerConfig p in n.Peers)
                // A warning, not an error: a router may start before its uplink or DNS, and the Resolver retries.
                if (p.EndpointText.Length > 0 && !p.Endpoint.IsSet)
                    stderr.WriteLine($"veil: warning: {of}peer {p.Name}: '{p.EndpointText}' does not resolve yet; the daemon keeps trying");
            foreach (string w in n.AllowedWarnings()) stderr.WriteLine("veil: warning: " + of + w);
        }
        // Before the Daemon exists: --check opens no TUN, socket or file for writing.
        if (cfg.CheckOnly)
        {
            foreach (UpConfig n in all)
            {
                Console.Out.WriteLine($"veil: configuration ok ({(n.NetworkName != null ? $"network {n.NetworkName}, " : "")}peers: {n.Peers.Count}, tun {n.TunName}, mtu {n.Mtu}" +
                    (n.AddressAuto ? $", address auto: {string.Join(", ", n.Addresses)})" : ")"));
                n.Wipe();
            }
            return 0;
        }
        Log LogOf(string tag) => new(Console.Out, stderr, cfg.LogLevel) { Json = cfg.LogJson, NoTimestamps = cfg.LogNoTimestamps, Tag = tag };
        var log = LogOf("");
        try { return cfg.NetworkName == null ? new Daemon(cfg, args, log).Run() : new Host(all, args, log, name => LogOf($"network={name} ")).Run(); }
        // Config problems found only while starting (a peer key that is a low-order point) exit 2 too: the
        // service unit's RestartPreventExitStatus=2 then keeps systemd from restarting into the same mistake.
        catch (ConfigException e) { stderr.WriteLine("veil: " + e.Message); return 2; }
        // One line per failure: the structured event for a JSON log's reader, else the plain sentence.
        catch (IOException e)
        {
            string hint = Doctor.HintFor(e.Message, cfg);
            if (cfg.LogJson) log.Error("fatal", $"error=\"{e.Message}\"" + (hint.Length > 0 ? $" hint=\"{hint}\"" : ""));
            else stderr.WriteLine("veil: " + e.Message + (hint.Length > 0 ? "; " + hint : ""));
            return 1;
        }
    }
}

// ==== 2. Constants & basic types =================================================================
// Spec holds protocol values both ends must agree on; Tune holds this implementation's limits.
// Key32 is a 32-byte secret or public key stored inline (no heap object, zeroable); IpPrefix is a
// masked CIDR; Endpoint is a UDP address kept as 16 bytes (IPv4 as ::ffff:a.b.c.d) plus a port so
// it can be compared and stored without allocation.

/// <summary>Where IPv4 and IPv6 headers keep what the node reads (RFC 791, RFC 8200).</summary>
internal static class Ip
{
    internal const int V4HeaderLen = 20, V6HeaderLen = 40;
    internal const int V4TotalLengthOffset = 2, V4FragmentOffset = 6, V4ProtocolOffset = 9, V4SourceOffset = 12, V4DestinationOffset = 16;
    internal const int V6PayloadLengthOffset = 4, V6NextHeaderOffset = 6, V6SourceOffset = 8, V6DestinationOffset = 24;
    internal const byte ProtocolTcp = 6, ProtocolUdp = 17;

    internal static int Version(ReadOnlySpan<byte> p) => p[0] >> 4;

    /// <summary>A destination no peer is meant to get: IPv4 multicast, broadcast or 169.254/16,
    /// IPv6 multicast or fe80::/10 (router solicitations and MLD reports the kernel sends by itself).</summary>
    internal static bool IsLinkScope(ReadOnlySpan<byte> p)
    {
        if (p.Length >= V4HeaderLen && Version(p) == 4)
        {
            byte d0 = p[V4DestinationOffset];
            return d0 >= 224 || d0 == 169 && p[V4DestinationOffset + 1] == 254;
        }
        return p.Length >= V6HeaderLen && Version(p) == 6 && (p[V6DestinationOffset] == 0xff || p[V6DestinationOffset] == 0xfe && (p[V6DestinationOffset + 1] & 0xc0) == 0x80);
    }
}

internal static class Spec
{
    internal const string NoiseProtocolName = "Noise_IKpsk2_25519_ChaChaPoly_SHA256";
    internal const string Prologue = "veil/1";              // mixed into h: both sides speak veil v1
    // The times and counts are WireGuard's (whitepaper §6.1), so a Veil node rekeys and gives up as wg
    // does; the names are the whitepaper's with the unit added.
    internal const long RekeyAfterTimeMs = 120_000;
    internal const long RejectAfterTimeMs = 180_000;
    internal const long RekeyAttemptTimeMs = 90_000;
    internal const long RekeyTimeoutMs = 5_000;             // handshake retransmit ceiling
    internal const long FirstRetransmitMs = 1_000;          // retransmits back off from here to RekeyTimeoutMs
    internal const long RekeyTimeoutJitterMaxMs = 333;
    internal const long KeepaliveTimeoutMs = 10_000;
    internal const long CookieRefreshTimeMs = 120_000;
    internal const ulong RekeyAfterMessages = 1UL << 60;
    internal const ulong RejectAfterMessages = ulong.MaxValue - (1UL << 13);
    internal const int MaxHandshakeAttempts = 20;            // ~90 s of retransmits, then give up
    internal const int KeyLen = 32;
    internal const int TagLen = 16;
    internal const int NonceLen = 12;                        // AEAD nonce: 4 zero bytes ‖ counter (§12)
    internal const int MacLen = 16;
    internal const int TimestampLen = 12;                    // TAI64N
    internal const int PadBlockLen = 16;                     // records are padded to a multiple of this

    // Preamble of every datagram: a TLS record header (content type, version 3.3, length).
    internal const byte TlsHandshake = 0x16;
    internal const byte TlsApplicationData = 0x17;
    internal const int PreambleLen = 5;
}

internal static class Tune
{
    internal const int MaxPeers = 1024;
    internal const int MaxNetworks = 16;                // [[network]] tables in one daemon
    internal const int MaxStagedPackets = 128;               // per peer, while no session is ready
    internal const int FirstStagedSlots = 8;                 // a peer's first staging ring; it doubles as needed
    internal const int MaxStagedBytes = 4 << 20;             // all peers' staging rings together
    internal const int BatchSize = 64;                       // packets moved per wake-up and stage
    internal const int SlotLen = 9216 + 128;                 // largest record (jumbo MTU) plus headroom
    internal const int DefaultMtu = 1420;
    // IPv6's minimum link MTU (RFC 8200 §5): below it the overlay could not carry IPv6 at all.
    internal const int MinMtu = 1280;
    internal const int MaxMtu = 9000;
    // WireGuard's port; `veil doctor` names it when wg already holds the port.
    internal const int DefaultListenPort = 51820;
    internal const long StaleHelloIntervalMs = 1_000;        // see ConsumeClientHello: clocks that went back
    internal const int MaxAnswerRepeats = 4;                 // a hello's answer is sent at most 1 + this many times
    // Recovery (§14.2): bad records on a live index start a handshake only when they persist this
    // long without one good record, and at most once per interval, so a forger gains no lever.
    internal const int DecryptFailuresBeforeRehandshake = 32;
    internal const long RecoveryQuietMs = Spec.RekeyTimeoutMs;
    internal const long RecoveryIntervalMs = 60_000;
    internal const int LogBurst = 10;                        // log lines per event kind per LogWindowMs
    internal const long LogWindowMs = 10_000;
    internal const long ShutdownGraceMs = 2_000;
    internal const int LogQueueLines = 4096;                  // lines waiting for the log writer; beyond: counted as lost
    internal const int MaxRevocations = 1024;                 // revoked keys a node keeps (and checks for)
    internal const int MaxMarksPerMember = 256;               // isolation marks one member may set (§15)
    internal const int MaxMarkingMembers = 64;                // members whose marks a node keeps
    internal const long MarkReorderWindowMs = 10_000;         // an older mark generation this soon after a newer: late, ignored
    internal const string DefaultControlPath = "/var/run/veil.sock";
    // The longest request, `revoke` with a signed revocation, is a few hundred bytes.
    internal const int MaxControlRequestLen = 4096;
    internal const int DefaultMaxSessions = 1024;
    internal const int DefaultHandshakeRate = 100;           // ClientHellos per second answered without a cookie
    internal const int DefaultHandshakeRatePerSource = 10;   // per source address; more are dropped
    internal const int CookieRepliesPerHandshake = 10;       // cookie replies/s per --handshake-rate; beyond, dropped
    // Workers (§14): each owns a TUN queue and a SO_REUSEPORT socket; they share the node under a lock.
    internal const int MaxWorkers = 16;
    internal const int AutoMaxWorkers = 8;
    internal static int AutoWorkers(int cpus) => cpus > 2 ? Math.Min(cpus, AutoMaxWorkers) : 1;
    // Mesh (§15). Every list a member can fill is bounded, so a hostile member cannot exhaust memory.
    internal const int DefaultMetric = 100;
    internal const int MaxClaimsPerMember = 32;
    internal const int MaxEndpointsPerMember = 8;            // announced by the member itself
    internal const int MaxEndpointsPerEntry = 4;             // passed on about a third member
    internal const int MaxExchangeLen = 1200;                // bytes of one exchange message (fits MinMtu)
    internal const int MaxProvisionalPeers = 256;            // --mesh: members whose first handshake is not confirmed (a hub many join at once)
    internal const int MaxNamePins = 2 * MaxPeers;
    internal const long MeshKeepaliveMs = 10_000;            // --mesh default --keepalive: liveness needs traffic
    internal const long JoinerKeepaliveMs = 25_000;          // veil join: the NAT mapping of a joiner stays open (wg's usual 25 s)
    internal const int LivenessKeepalives = 3;               // keepalive periods without a record: the peer is down
    internal const long ExchangeIntervalMs = 60_000;
    internal const int MaxFilterRules = 256;
    internal const long AutoAddressGraceMs = 120_000;     // a collision moves an auto address only this soon after it was taken
    internal const long ExchangeDebounceMs = 1_000;          // a change is told to peers at most this often
    internal const long ClaimLifetimeMs = 3 * ExchangeIntervalMs;
    internal const long ForgetMemberAfterMs = 300_000;       // learned members silent this long are dropped
    internal const long MembersRefreshMs = 240_000;          // an unchanged member list is told again this often (< ForgetMemberAfterMs)
    internal const long MembersSettleMs = 5_000;             // a list that only shrank waits this long (a rekey's relayed moment)
    internal const long ProvisionalLifetimeMs = 15_000;
    internal const long FirstReconnectMs = 1_000;
    internal const long MaxReconnectMs = 120_000;
    // Paths (§15): relays and hole punching.
    internal const int MaxRelayPairs = 64;                   // pairs of members one relay carries at once
    internal const int DefaultRelayRateMbit = 20;            // per pair and direction; beyond, dropped
    internal const long RelayPairIdleMs = 10_000;            // a full table gives a direction silent this long to a new one
    internal const long MemberHelloYieldMs = 1_500;          // --mesh: the higher key of a new pair waits this long for a hello (Mesh.ApplyMembers)
    internal const long DirectQuietMs = 5_000;               // no direct record this long: a relay may carry the peer
    internal const long TcpFallbackMs = 3_000;               // no UDP record from anyone this long: try --peer-tcp
    internal const long FirstPunchMs = 300;                  // after a relayed session is up (its Self comes first)
    internal const long MaxPunchIntervalMs = 60_000;         // punch rounds back off from 2 s to this
    internal const long PunchAnswerIntervalMs = 1_000;       // a member's Punch is answered at most this often
    internal const int PunchPrimeTtl = 2;                    // opens our own NAT, dies before the other's
}

/// <summary>32 bytes held inline: keys, hashes, chaining keys.</summary>
[InlineArray(32)]
internal struct Key32
{
    private byte _e0;

    internal static bool TryParseBase64(string s, out Key32 key)
    {
        key = default;
        // Decoded on the stack and zeroed after: no further copy of a secret is left on the heap. One byte
        // spare, so 33 decoded bytes come back as a wrong length, not as a too-small buffer.
        Span<byte> buf = stackalloc byte[33];
        if (!Convert.TryFromBase64String(s.Trim(), buf, out int n) || n != 32) return false;
        buf[..32].CopyTo(key);
        CryptographicOperations.ZeroMemory(buf);
        return true;
    }

    internal readonly string ToBase64() => Convert.ToBase64String(this);
    internal readonly string Short() => ToBase64()[..8] + "…";   // never log a key, log its start
    /// <summary>A peer's name when none is given: the key's first 8 base64 characters, '+' and '/'
    /// as '-' and '_' so it is a valid name (in a config file, on the wire).</summary>
    internal readonly string DefaultName() => ToBase64()[..8].Replace('+', '-').Replace('/', '_');
    internal void Clear() => CryptographicOperations.ZeroMemory(this);
    internal readonly bool IsZero()
    {
        int acc = 0;
        foreach (byte b in this) acc |= b;
        return acc == 0;
    }
    internal readonly bool EqualsCt(in Key32 other) => CryptographicOperations.FixedTimeEquals(this, other);
    /// <summary>The order of public keys (not secret) that every node agrees on, for tie-breaks.</summary>
    internal readonly bool SortsBefore(in Key32 other) => ((ReadOnlySpan<byte>)this).SequenceCompareTo(other) < 0;
}

/// <summary>A CIDR prefix with the host bits cleared. Address is 16 bytes (IPv4 in the first 4).</summary>
internal readonly struct IpPrefix : IEquatable<IpPrefix>
{
    private readonly UInt128 _bits;      // the address, big-endian, left-aligned (IPv4 in the top 32 bits)
    internal int Bits { get; }
    internal bool IsV6 { get; }
    internal int MaxBits => IsV6 ? 128 : 32;

    internal bool Overlaps(IpPrefix other) => Covers(other) || other.Covers(this);

    /// <summary>True when every address of inner is inside this prefix.</summary>
    internal bool Covers(IpPrefix inner) =>
        IsV6 == inner.IsV6 && Bits <= inner.Bits && (Bits == 0 || (inner._bits & (UInt128.MaxValue << (128 - Bits))) == _bits);

    internal IpPrefix(ReadOnlySpan<byte> address, int bits)
    {
        IsV6 = address.Length == 16;
        Span<byte> a = stackalloc byte[16];
        a.Clear();
        address.CopyTo(a);
        UInt128 v = BinaryPrimitives.ReadUInt128BigEndian(a);
        Bits = bits;
        // bits == 0 is special: .NET masks a shift count, so a shift by 128 would be a shift by 0 and keep
        // every bit. Clearing the host bits makes 10.1.2.3/8 and 10.0.0.0/8 the same prefix.
        _bits = bits == 0 ? UInt128.Zero : v & (UInt128.MaxValue << (128 - bits));
    }

    /// <summary>Bit i (0 = most significant) of the prefix address.</summary>
    internal int Bit(int i) => (int)(_bits >> (127 - i)) & 1;
    internal UInt128 Value => _bits;

    internal bool Contains(ReadOnlySpan<byte> address)
    {
        if ((address.Length == 16) != IsV6) return false;
        return new IpPrefix(address, Bits)._bits == _bits;
    }

    internal static bool TryParse(string s, out IpPrefix p)
    {
        p = default;
        int slash = s.IndexOf('/');
        string addr = slash < 0 ? s : s[..slash];
        // A zone (fe80::1%eth0) names a link, which a route or an allowed prefix cannot carry.
        if (addr.Contains('%') || !IPAddress.TryParse(addr, out IPAddress? ip)) return false;
        if (ip.AddressFamily != AddressFamily.InterNetwork && ip.AddressFamily != AddressFamily.InterNetworkV6) return false;
        int max = ip.AddressFamily == AddressFamily.InterNetwork ? 32 : 128;
        int bits = max;
        if (slash >= 0)
        {
            string b = s[(slash + 1)..];
            if (b.Length == 0 || b.Length > 3 || !int.TryParse(b, System.Globalization.NumberStyles.None, null, out bits) || bits > max) return false;
        }
        p = new IpPrefix(ip.GetAddressBytes(), bits);
        return true;
    }

    internal static IpPrefix Parse(string s) =>
        TryParse(s, out IpPrefix p) ? p : throw new FormatException($"not a CIDR prefix: '{s}'");

    internal void WriteAddress(Span<byte> dst)
    {
        Span<byte> a = stackalloc byte[16];
        BinaryPrimitives.WriteUInt128BigEndian(a, _bits);
        a[..(IsV6 ? 16 : 4)].CopyTo(dst);
    }

    public override string ToString()
    {
        Span<byte> a = stackalloc byte[16];
        WriteAddress(a);
        return new IPAddress(a[..(IsV6 ? 16 : 4)]).ToString() + "/" + Bits;
    }

    public bool Equals(IpPrefix o) => _bits == o._bits && Bits == o.Bits && IsV6 == o.IsV6;
    public override bool Equals(object? o) => o is IpPrefix p && Equals(p);
    public override int GetHashCode() => HashCode.Combine(_bits, Bits, IsV6);
}

/// <summary>An interface address with its prefix length, e.g. 100.64.0.1/24 (host bits kept).</summary>
internal readonly record struct IfAddress(IPAddress Address, int Bits)
{
    internal bool IsV6 => Address.AddressFamily == AddressFamily.InterNetworkV6;
    internal static bool TryParse(string s, out IfAddress a)
    {
        a = default;
        int slash = s.IndexOf('/');
        if (slash < 0 || !IpPrefix.TryParse(s, out IpPrefix p)) return false;
        a = new IfAddress(IPAddress.Parse(s[..slash]), p.Bits);
        return true;
    }
    internal IpPrefix Host => new(Address.GetAddressBytes(), IsV6 ? 128 : 32);
    public override string ToString() => Address + "/" + Bits;
}

/// <summary>A UDP endpoint as 16 address bytes (IPv4 mapped into ::ffff:0:0/96) and a port.</summary>
internal struct Endpoint : IEquatable<Endpoint>
{
    internal UInt128 Address;     // big-endian value of the 16 bytes
    internal ushort Port;

    // IPv4 as ::ffff:a.b.c.d (RFC 4291 §2.5.5.2), so one 16-byte compare serves both families and an
    // IPv4 peer seen on the dual-stack socket equals the same peer given in the config.
    private static readonly UInt128 V4MappedPrefix = (UInt128)0xFFFF << 32;
    private static readonly UInt128 V4Mask = UInt128.MaxValue << 32;

    internal readonly bool IsV4 => (Address & V4Mask) == V4MappedPrefix;
    internal readonly bool IsSet => Port != 0;

    internal static Endpoint FromIp(IPAddress ip, int port)
    {
        if (ip.AddressFamily == AddressFamily.InterNetwork) ip = ip.MapToIPv6();
        Span<byte> a = stackalloc byte[16];
        ip.TryWriteBytes(a, out _);
        return new Endpoint { Address = BinaryPrimitives.ReadUInt128BigEndian(a), Port = (ushort)port };
    }

    internal static Endpoint FromV4(uint addressBigEndianValue, ushort port) =>
        new() { Address = V4MappedPrefix | addressBigEndianValue, Port = port };

    internal readonly void WriteAddress16(Span<byte> dst) => BinaryPrimitives.WriteUInt128BigEndian(dst, Address);

    internal readonly IPAddress ToIp()
    {
        Span<byte> a = stackalloc byte[16];
        WriteAddress16(a);
        return IsV4 ? new IPAddress(a[12..]) : new IPAddress(a);
    }

    /// <summary>Parses HOST:PORT or [V6]:PORT where HOST is a literal address; names are resolved by the caller.</summary>
    internal static bool TrySplitHostPort(string s, out string host, out int port)
    {
        host = ""; port = 0;
        int colon;
        if (s.StartsWith('['))
        {
            int close = s.IndexOf(']');
            if (close < 0 || close + 1 >= s.Length || s[close + 1] != ':') return false;
            host = s[1..close];
            colon = close + 1;
            if (!IPAddress.TryParse(host, out IPAddress? ip) || ip.AddressFamily != AddressFamily.InterNetworkV6) return false;
        }
        else
        {
            colon = s.LastIndexOf(':');
            if (colon <= 0 || s.IndexOf(':') != colon) return false;   // bare IPv6 needs brackets
            host = s[..colon];
        }
        string p = s[(colon + 1)..];
        return p.Length is > 0 and <= 5 && int.TryParse(p, System.Globalization.NumberStyles.None, null, out port) && port is > 0 and <= 65535;
    }

    public override readonly string ToString() =>
        IsV4 ? ToIp() + ":" + Port : "[" + ToIp() + "]:" + Port;
    public readonly bool Equals(Endpoint o) => Address == o.Address && Port == o.Port;
    public override readonly bool Equals(object? o) => o is Endpoint e && Equals(e);
    public override readonly int GetHashCode() => HashCode.Combine(Address, Port);
}

// ==== 3. Diagnostics =============================================================================
// Log writes one line per event to stderr as key=value pairs, with a level filter and a per-event
// rate limit so a flood of bad packets cannot flood the log (suppressed lines are counted and
// reported when the window reopens). Counters are plain longs owned by the loop thread; drops are
// counted by DropReason and never logged per packet. Mono is the only clock; Part C reads it and
// passes nowMs down.

internal enum LogLevel { Error = 0, Warn = 1, Info = 2, Debug = 3 }

internal sealed class Log
{
    private sealed class Budget { internal long WindowStartMs; internal int Used; internal int Suppressed; }

    private readonly TextWriter _out, _err;        // info/debug, warn/error (procd logs them as daemon.info / daemon.err)
    private readonly Dictionary<string, Budget> _budgets = new();
    internal LogLevel Level;
    internal bool Json;
    internal bool NoTimestamps;                    // --log-format plain: logd and journald stamp each line already
    internal string Tag = "";                      // "network=NAME " for one network of several

    internal Log(TextWriter output, LogLevel level) : this(output, output, level) { }
    internal Log(TextWriter output, TextWriter errors, LogLevel level) { _out = output; _err = errors; Level = level; }

    internal bool On(LogLevel level) => level <= Level;

    /// <summary>Writes "ts=… level=… event=NAME fields" unless the level is off or NAME is over budget.</summary>
    internal void Write(LogLevel level, string name, string fields)
    {
        Hooks?.Offer(name, fields);                    // whatever the level: a hook is not a log line
        if (Wants(level, name)) Emit(level, name, fields);
    }

    internal Hooks? Hooks;

    /// <summary>True (and one line of NAME's budget spent) when a line may be written now. Callers on
    /// paths an attacker can drive ask first, so a flood costs no string formatting.</summary>
    internal bool Wants(LogLevel level, string name)
    {
        if (!On(level)) return false;
        lock (_budgets) return Spend(name);
    }

    // Must hold _budgets. One budget per event name: a flood of one kind cannot silence the others.
    private bool Spend(string name)
    {
        long nowMs = Mono.NowMs();
        if (!_budgets.TryGetValue(name, out Budget? b)) _budgets[name] = b = new Budget { WindowStartMs = nowMs };
        if (nowMs - b.WindowStartMs >= Tune.LogWindowMs)
        {
            // Emit takes the writing lock while _budgets is held: the order the header allows (budget, then
            // writing), and Emit never takes _budgets.
            if (b.Suppressed > 0) Emit(LogLevel.Warn, "log_suppressed", $"of={name} lines={b.Suppressed}");
            b.WindowStartMs = nowMs; b.Used = 0; b.Suppressed = 0;
        }
        if (b.Used >= Tune.LogBurst) { b.Suppressed++; return false; }
        b.Used++;
        return true;
    }

    internal void Error(string name, string fields) => Write(LogLevel.Error, name, fields);
    internal void Warn(string name, string fields) => Write(LogLevel.Warn, name, fields);
    internal void Info(string name, string fields) => Write(LogLevel.Info, name, fields);
    internal void Debug(string name, string fields) => Write(LogLevel.Debug, name, fields);

    internal void Emit(LogLevel level, string name, string fields)
    {
        TextWriter w = level <= LogLevel.Warn ? _err : _out;
        string line = Line(level, name, fields);
        if (_queue is { } queue) { Enqueue(queue, w, line); return; }
        lock (_writing)                                // workers' threads log too: whole lines, one at a time
        {
            w.WriteLine(line);
            w.Flush();
        }
    }

    // The daemon's lines are written by a thread of their own: a write to a pipe whose reader
    // (procd, journald, a terminal) is slow would otherwise stall whoever logs, the packet path
    // included. The queue is bounded; what does not fit is counted and reported once there is room.
    private LineQueue? _queue;
    private readonly AutoResetEvent _written = new(false);
    private readonly object _writing = new();
    private Thread? _writer;
    private volatile bool _stopWriter;
    private int _queued, _lost;

    internal void StartWriter()
    {
        LineQueue queue = _queue = new();
        _writer = new Thread(() => WriteQueued(queue)) { IsBackground = true, Name = "veil-log" };
        _writer.Start();
    }

    /// <summary>Writes what is queued and goes back to writing each line at once.</summary>
    internal void StopWriter()
    {
        if (_writer == null) return;
        _stopWriter = true;
        _written.Set();
        // Bounded: a reader that stopped reading cannot hold the daemon's exit; what is left is written
        // here, on the caller's thread.
        _writer.Join((int)Tune.ShutdownGraceMs);
        _writer = null;
        var queue = _queue!;
        _queue = null;
        WriteOut(queue);
    }

    private void Enqueue(LineQueue queue, TextWriter w, string line)
    {
        // Counted before it is queued, so the bound holds across threads without a lock.
        if (Interlocked.Increment(ref _queued) > Tune.LogQueueLines)
        {
            Interlocked.Decrement(ref _queued);
            Interlocked.Increment(ref _lost);
            return;
        }
        queue.Enqueue((w, line));
        _written.Set();
    }

    private void WriteQueued(LineQueue queue)
    {
        while (!_stopWriter)
        {
            // One Set may stand for many lines: each wake-up drains the whole queue.
            _written.WaitOne();
            WriteOut(queue);
        }
    }

    private void WriteOut(LineQueue queue)
    {
        lock (_writing)
        {
            while (queue.TryDequeue(out var q))
            {
                Interlocked.Decrement(ref _queued);                // the bound counts lines waiting
                q.To.WriteLine(q.Line);
            }
            if (Interlocked.Exchange(ref _lost, 0) is int lost and > 0)
                _err.WriteLine(Line(LogLevel.Warn, "log_lost", $"lines={lost} hint=\"the log reader fell behind\""));
            _out.Flush();
            _err.Flush();
        }
    }

    private string Line(LogLevel level, string name, string fields)
    {
        // UTC with milliseconds: lines of nodes in different time zones sort together, and the only place
        // the wall clock is read for the log.
        string ts = DateTime.UtcNow.ToString("yyyy-MM-ddTHH:mm:ss.fffZ", System.Globalization.CultureInfo.InvariantCulture);
        if (Tag.Length > 0) fields = fields.Length > 0 ? Tag + fields : Tag.TrimEnd();
        return Json ? JsonLine(ts, level, name, fields) : $"{(NoTimestamps ? "" : $"ts={ts} ")}level={LevelName(level)} event={name}{(fields.Length > 0 ? " " : "")}{fields}";
    }

    /// <summary>The key=value pairs of a line's fields: a value written "like this" is one value, and
    /// ends at the next '"' (there is no escape inside quotes in the text format).</summary>
    internal static List<(string Key, string Value)> Fields(string fields)
    {
        var list = new List<(string, string)>();
        int i = 0;
        while (i < fields.Length)
        {
            while (i < fields.Length && fields[i] == ' ') i++;
            int eq = fields.IndexOf('=', i);
            if (eq < 0) break;
            string key = fields[i..eq];
            int start = eq + 1, end;
            if (start < fields.Length && fields[start] == '"') { end = fields.IndexOf('"', start + 1); if (end < 0) end = fields.Length; list.Add((key, fields[(start + 1)..end])); i = end + 1; }
            else { end = fields.IndexOf(' ', start); if (end < 0) end = fields.Length; list.Add((key, fields[start..end])); i = end; }
        }
        return list;
    }

    // The same pairs as one JSON object.
    internal static string JsonLine(string ts, LogLevel level, string name, string fields)
    {
        var sb = new StringBuilder();
        sb.Append("{\"ts\":\"").Append(ts).Append("\",\"level\":\"").Append(LevelName(level)).Append("\",\"event\":");
        JsonText.Str(sb, name);
        foreach (var (key, value) in Fields(fields))
        {
            sb.Append(',');
            JsonText.Str(sb, key);
            sb.Append(':');
            JsonText.Str(sb, value);
        }
        return sb.Append('}').ToString();
    }

    internal static string LevelName(LogLevel l) => l switch
    {
        LogLevel.Error => "error", LogLevel.Warn => "warn", LogLevel.Info => "info", _ => "debug",
    };

    internal static bool TryParseLevel(string s, out LogLevel l)
    {
        l = LogLevel.Info;
        switch (s)
        {
            case "error": l = LogLevel.Error; return true;
            case "warn": l = LogLevel.Warn; return true;
            case "info": l = LogLevel.Info; return true;
            case "debug": l = LogLevel.Debug; return true;
            default: return false;
        }
    }
}

/// <summary>The one JSON string writer, for status, the management endpoint and JSON log lines, so a
/// string is escaped the same way everywhere (RFC 8259: quote, backslash and control characters).
/// Written here rather than taken from System.Text.Json, whose writer adds 0.7 MB to the binary.</summary>
internal static class JsonText
{
    internal static void Str(StringBuilder sb, string s)
    {
        sb.Append('"');
        foreach (char c in s)
        {
            if (c is '"' or '\\') sb.Append('\\').Append(c);
            else if (c < 0x20) sb.Append("\\u").Append(((int)c).ToString("x4", System.Globalization.CultureInfo.InvariantCulture));
            else sb.Append(c);
        }
        sb.Append('"');
    }
}

/// <summary>Programs Veil runs (hooks, beacon commands, systemctl), without a shell: posix_spawnp in
/// a process group of their own, with default signal handling and an empty signal mask (the runtime
/// ignores SIGPIPE, and an exec would keep that), input on stdin, output collected up to a bound, and
/// the whole group killed after a timeout. System.Diagnostics.Process would add about 0.3 MB to the
/// binary: it brings System.Uri and the terminal database along.</summary>
internal static unsafe class Spawn
{
    internal readonly record struct Exit(int Code, bool TimedOut, string Output);

    // Opaque libc objects, sized for the largest C library we run on (glibc: 80, 336 and 128 bytes).
    private const int ActionsLen = 256, AttrLen = 512, SigSetLen = 256;
    private const short SetPGroup = 0x2, SetSigDefault = 0x4, SetSigMask = 0x8;   // POSIX_SPAWN_*, the same in glibc and musl
    private const int PipeChunk = 4096;         // PIPE_BUF: a write this long into a pipe poll calls writable never blocks

    /// <summary>Runs argv with env (KEY=VALUE strings); stderr joins the output when withStderr, else
    /// goes to /dev/null. Throws IOException when the program cannot start.</summary>
    internal static Exit Run(string[] argv, string[] env, string? input, bool withStderr, int maxOutputBytes, int timeoutMs)
    {
        int* toChild = stackalloc int[2], fromChild = stackalloc int[2];
        if (Libc.Pipe2(toChild, Libc.O_CLOEXEC) < 0) throw new IOException("pipe: " + Libc.ErrorText(Libc.Errno));
        if (Libc.Pipe2(fromChild, Libc.O_CLOEXEC) < 0)
        {
            int errno = Libc.Errno;
            Libc.Close(toChild[0]); Libc.Close(toChild[1]);
            throw new IOException("pipe: " + Libc.ErrorText(errno));
        }
        byte* actions = stackalloc byte[ActionsLen], attr = stackalloc byte[AttrLen], signals = stackalloc byte[SigSetLen];
        new Span<byte>(signals, SigSetLen).Clear();
        var strings = new byte[argv.Length + env.Length][];
        for (int i = 0; i < strings.Length; i++) strings[i] = Encoding.UTF8.GetBytes((i < argv.Length ? argv[i] : env[i - argv.Length]) + "\0");
        var pins = new System.Runtime.InteropServices.GCHandle[strings.Length];
        byte[] devNull = "/dev/null\0"u8.ToArray();
        int pid = 0, err;
        try
        {
            nint* args = stackalloc nint[argv.Length + 1], envp = stackalloc nint[env.Length + 1];
            for (int i = 0; i < strings.Length; i++)
            {
                pins[i] = System.Runtime.InteropServices.GCHandle.Alloc(strings[i], System.Runtime.InteropServices.GCHandleType.Pinned);
                if (i < argv.Length) args[i] = pins[i].AddrOfPinnedObject(); else envp[i - argv.Length] = pins[i].AddrOfPinnedObject();
            }
            args[argv.Length] = envp[env.Length] = 0;
            Libc.SpawnActionsInit(actions);
            Libc.SpawnAttrInit(attr);
            fixed (byte* nullPath = devNull)
            {
                // The pipes are close-on-exec; their dup2 copies on 0, 1 and 2 are not.
                Libc.SpawnActionsDup2(actions, toChild[0], 0);
                Libc.SpawnActionsDup2(actions, fromChild[1], 1);
                if (withStderr) Libc.SpawnActionsDup2(actions, fromChild[1], 2);
                else Libc.SpawnActionsOpen(actions, 2, nullPath, Libc.O_WRONLY, 0);
                Libc.SigEmptySet(signals);
                Libc.SpawnAttrSetSigMask(attr, signals);
                for (int sig = 1; sig < 32; sig++) if (sig is not (Libc.SIGKILL or 19)) Libc.SigAddSet(signals, sig);   // 19: SIGSTOP
                Libc.SpawnAttrSetSigDefault(attr, signals);
                Libc.SpawnAttrSetPGroup(attr, 0);
                Libc.SpawnAttrSetFlags(attr, SetPGroup | SetSigDefault | SetSigMask);
                err = Libc.PosixSpawnP(&pid, (byte*)args[0], actions, attr, args, envp);
            }
        }
        finally
        {
            Libc.SpawnActionsDestroy(actions);
            Libc.SpawnAttrDestroy(attr);
            foreach (var pin in pins) if (pin.IsAllocated) pin.Free();
            Libc.Close(toChild[0]);
            Libc.Close(fromChild[1]);
        }
        if (err != 0)
        {
            Libc.Close(toChild[1]); Libc.Close(fromChild[0]);
            throw new IOException($"cannot run {argv[0]}: {Libc.ErrorText(err)}");
        }
        return Collect(pid, toChild[1], fromChild[0], Encoding.UTF8.GetBytes(input ?? ""), maxOutputBytes, timeoutMs);
    }

    // Feeds the input, reads the output until it ends and the program has exited, or kills the group.
    private static Exit Collect(int pid, int inFd, int outFd, byte[] input, int maxOutputBytes, int timeoutMs)
    {
        var output = new MemoryStream();
        byte[] buf = new byte[PipeChunk];
        long deadline = Mono.NowMs() + timeoutMs;
        int sent = 0, status = 0;
        bool exited = false;
        Libc.PollFd* fds = stackalloc Libc.PollFd[2];
        if (input.Length == 0) { Libc.Close(inFd); inFd = -1; }
        try
        {
            while (outFd >= 0 || !exited)
            {
                long leftMs = deadline - Mono.NowMs();
                if (leftMs <= 0)
                {
                    Libc.Kill(-pid, Libc.SIGKILL);
                    while (Libc.WaitPid(pid, &status, 0) < 0 && Libc.Errno == Libc.EINTR) { }
                    return new Exit(-1, true, Encoding.UTF8.GetString(output.ToArray()));
                }
                if (!exited && Libc.WaitPid(pid, &status, Libc.WNOHANG) == pid) exited = true;
                int n = 0;
                if (outFd >= 0) fds[n++] = new Libc.PollFd { Fd = outFd, Events = Libc.POLLIN };
                if (inFd >= 0) fds[n++] = new Libc.PollFd { Fd = inFd, Events = Libc.POLLOUT };
                // Output open: wait on it. Output closed, program still running: look again shortly.
                if (Libc.Poll(fds, (nuint)n, (int)Math.Min(leftMs, n == 0 || outFd < 0 ? 10 : 100)) <= 0) continue;
                for (int i = 0; i < n; i++)
                {
                    if (fds[i].REvents == 0) continue;
                    if (fds[i].Fd == outFd)
                    {
                        nint got;
                        fixed (byte* b = buf) got = Libc.Read(outFd, b, (nuint)buf.Length);
                        if (got > 0 && output.Length < maxOutputBytes) output.Write(buf, 0, (int)Math.Min(got, maxOutputBytes - output.Length));
                        else if (got == 0 || (got < 0 && Libc.Errno != Libc.EINTR)) { Libc.Close(outFd); outFd = -1; }
                    }
                    else
                    {
                        nint put;
                        fixed (byte* b = input) put = Libc.Write(inFd, b + sent, (nuint)Math.Min(PipeChunk, input.Length - sent));
                        if (put > 0) sent += (int)put;
                        if (sent == input.Length || (put < 0 && Libc.Errno != Libc.EINTR)) { Libc.Close(inFd); inFd = -1; }   // done, or the program closed its stdin
                    }
                }
            }
            return new Exit((status & 0x7F) == 0 ? (status >> 8) & 0xFF : 128 + (status & 0x7F), false, Encoding.UTF8.GetString(output.ToArray()));
        }
        finally
        {
            if (inFd >= 0) Libc.Close(inFd);
            if (outFd >= 0) Libc.Close(outFd);
        }
    }

    /// <summary>Our environment with extra KEY=VALUE pairs over it.</summary>
    internal static string[] Environment(IEnumerable<(string Key, string Value)> extra)
    {
        var env = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (System.Collections.DictionaryEntry e in System.Environment.GetEnvironmentVariables()) env[(string)e.Key] = (string?)e.Value ?? "";
        foreach (var (key, value) in extra) env[key] = value;
        var list = new List<string>(env.Count);
        foreach (var (key, value) in env) list.Add(key + "=" + value);
        return [.. list];
    }
}

/// <summary>--hook EVENT=PROGRAM: the program runs for each such event (a Log event name), as argv
/// [PROGRAM, EVENT] without a shell, with the event's fields in the environment (VEIL_EVENT,
/// VEIL_PEER, VEIL_ENDPOINT, VEIL_PREFIX, ...), on a thread of its own: one hook at a time, at most
/// HookTimeoutMs each (then killed), its output in the log, at most MaxPending waiting (the rest
/// counted as dropped). Offer is called by whoever logs, the packet path included: it only queues.</summary>
internal sealed class Hooks : IDisposable
{
    internal static readonly string[] Events = ["peer_up", "peer_down", "peer_joined", "endpoint_changed", "route_added", "route_removed", "handshake_gave_up", "reloaded", "reload_rolled_back"];
    internal const string AllEvents = "all";        // --hook all=PROGRAM: every event without a hook of its own
    private const int MaxPending = 64, HookTimeoutMs = 10_000, MaxOutputLines = 20, MaxOutputBytes = 16 * 1024;
    private volatile Dictionary<string, string> _programs;
    private readonly Queue<(string Event, string Fields)> _pending = new();
    private readonly AutoResetEvent _kick = new(false);
    private readonly Log _log;
    private readonly Thread _thread;
    private volatile bool _stop;
    internal long Ran, Failed, Dropped;

    internal Hooks(Dictionary<string, string> programs, Log log)
    {
        _programs = programs;
        _log = log;
        _thread = new Thread(Run) { IsBackground = true, Name = "veil-hooks" };
        _thread.Start();
    }

    internal void SetPrograms(Dictionary<string, string> programs) => _programs = programs;

    private string? Program(string name)
    {
        Dictionary<string, string> programs = _programs;
        if (Array.IndexOf(Events, name) < 0) return null;      // only events are hooks: not every log line
        return programs.TryGetValue(name, out string? p) || programs.TryGetValue(AllEvents, out p) ? p : null;
    }

    internal void Offer(string name, string fields)
    {
        if (Program(name) == null) return;
        lock (_pending)
        {
            if (_pending.Count >= MaxPending) { Dropped++; return; }
            _pending.Enqueue((name, fields));
        }
        _kick.Set();
    }

    private void Run()
    {
        while (!_stop)
        {
            (string Event, string Fields) e;
            bool any;
            lock (_pending) any = _pending.TryDequeue(out e);
            if (!any) { _kick.WaitOne(); continue; }
            if (Program(e.Event) is string program) RunOne(program, e.Event, e.Fields);
        }
    }

    private void RunOne(string program, string name, string fields)
    {
        var vars = new List<(string, string)> { ("VEIL_EVENT", name) };
        foreach (var (key, value) in Log.Fields(fields)) vars.Add(("VEIL_" + key.ToUpperInvariant(), value));
        try
        {
            Spawn.Exit p = Spawn.Run([program, name], Spawn.Environment(vars), null, withStderr: true, MaxOutputBytes, HookTimeoutMs);
            if (p.TimedOut)
            {
                Failed++;
                _log.Warn("hook_timeout", $"event={name} program={program} after_ms={HookTimeoutMs}");
                return;
            }
            Ran++;
            int lines = 0;
            foreach (string line in p.Output.Split('\n', StringSplitOptions.RemoveEmptyEntries))
                if (lines++ < MaxOutputLines) _log.Info("hook_output", $"event={name} line=\"{line.Replace("\"", "'")}\"");
            if (p.Code != 0) { Failed++; _log.Warn("hook_failed", $"event={name} program={program} exit={p.Code}"); }
        }
        catch (IOException ex)
        {
            Failed++;
            _log.Warn("hook_failed", $"event={name} program={program} error=\"{ex.Message}\"");
        }
    }

    public void Dispose()
    {
        _stop = true;
        _kick.Set();
        _thread.Join(HookTimeoutMs + 1000);
    }
}

/// <summary>Why a packet was dropped. Names are the keys of the status "drops" object.</summary>
internal enum DropReason
{
    Truncated,          // shorter than its header or its own length field
    Malformed,          // unknown type, bad flags, bad padding, bad inner IP header
    UnknownIndex,       // record for a session we do not have
    BadAuth,            // AEAD tag did not verify
    Replayed,           // counter already seen
    TooOld,             // counter behind the replay window
    Expired,            // session older than RejectAfterTime or past RejectAfterMessages
    NoRoute,            // outbound destination matches no peer
    SourceNotAllowed,   // inbound inner source not routed to the sending peer
    BadMac1,            // handshake not keyed to our public key
    BadMac2,            // handshake under load without a valid cookie
    UnknownPeer,        // ClientHello from a static key we do not know
    StaleHello,         // ClientHello timestamp not newer than the last one (replay)
    HandshakeFailed,    // handshake message did not decrypt
    QueueFull,          // staged packet pushed out by a newer one
    Refused,            // ClientHello over the admission budget (rate per source, max sessions)
    TunWrite,           // the kernel refused a packet on the TUN
    UdpSend,            // the kernel refused a datagram
    BadExchange,        // a member's exchange message was malformed or over a bound (§15)
    RelayRefused,       // a Relay record this node would not carry: not offered, no such member up, malformed (§15)
    RelayRate,          // a relayed pair over its byte budget (§15)
    LinkLocal,          // outbound to a link-local or multicast address with no route: the kernel's own chatter
    Isolated,           // --isolate: inbound from one peer to another, which this node does not carry
    Filtered,           // --filter: no rule allows it (or one denies it), in either direction
    ExitRefused,        // --exit-for: a member this exit does not serve sent something for the uplink
    MacNotAllowed,      // --mode tap|hub: a frame from a source MAC the peer may not use, or over its share (§8.1)
    Count,
}

internal sealed class Counters
{
    internal readonly long[] Drops = new long[(int)DropReason.Count];
    internal long RxRecords, TxRecords, RxBytes, TxBytes;
    internal long TunRxPackets, TunTxPackets;
    internal long TunSuperPackets, TunCoalesced;      // offloads: super-packets read and split; segments merged on write
    internal long HandshakesInitiated, HandshakesCompleted, CookiesSent;
    internal long HellosRepeated, AnswersRepeated;    // retransmitted ClientHellos, and ServerHellos sent again to them

    // Plain increments: counters are written under node.Gate (§0), and status reads them under it too.
    internal void Drop(DropReason r) => Drops[(int)r]++;

    internal static string DropName(DropReason r) => r switch
    {
        DropReason.Truncated => "truncated", DropReason.Malformed => "malformed",
        DropReason.UnknownIndex => "unknown_index", DropReason.BadAuth => "bad_auth",
        DropReason.Replayed => "replayed", DropReason.TooOld => "too_old", DropReason.Expired => "expired",
        DropReason.NoRoute => "no_route", DropReason.SourceNotAllowed => "source_not_allowed",
        DropReason.BadMac1 => "bad_mac1", DropReason.BadMac2 => "bad_mac2",
        DropReason.UnknownPeer => "unknown_peer", DropReason.StaleHello => "stale_hello",
        DropReason.HandshakeFailed => "handshake_failed", DropReason.QueueFull => "queue_full", DropReason.Refused => "refused",
        DropReason.TunWrite => "tun_write", DropReason.UdpSend => "udp_send", DropReason.BadExchange => "bad_exchange",
        DropReason.RelayRefused => "relay_refused", DropReason.RelayRate => "relay_rate",
        DropReason.LinkLocal => "link_local", DropReason.Isolated => "isolated", DropReason.Filtered => "filtered", DropReason.ExitRefused => "exit_refused",
        DropReason.MacNotAllowed => "mac_not_allowed", _ => "other",
    };
}

/// <summary>The monotonic clock. Only drivers (Part C) call it; everything below takes nowMs.</summary>
internal static class Mono
{
    // Milliseconds since boot: never stepped by NTP or the user, so deadlines and ages cannot go back.
    internal static long NowMs() => Environment.TickCount64;
}

// ==== 4. Config ==================================================================================
// Turns `veil up` flags and an optional TOML file into an UpConfig, or fails with one line naming
// the flag (or file:line and key) and what is wrong. Every flag has a key of the same name in the
// file ("--rekey-after" is "rekey_after"); a flag wins over the file, --address replaces the file's
// list, and --peer adds to the file's peers (a flag peer with the same key replaces the file's).
// Everything is validated before anything is created: key files are read and refused when group or
// others may read them, names are resolved, numbers are range-checked. Reload parses afresh and
// diffs (RestartKeys says which keys a running daemon cannot change). The TOML subset: tables,
// arrays of tables, strings, integers, booleans, arrays; unknown and duplicate keys are errors.

// A config error is one line on stderr or in a log line, so control characters a value carried
// (a TOML "\n" escape, a flag) are shown escaped and cannot forge another line.
internal sealed class ConfigException(string message) : Exception(OneLine(message))
{
    private static string OneLine(string text)
    {
        if (!text.AsSpan().ContainsAnyInRange('\0', '\x1f') && !text.Contains('\x7f')) return text;
        var sb = new StringBuilder(text.Length + 8);
        foreach (char ch in text)
            if (ch < ' ' || ch == '\x7f') sb.Append("\\x").Append(((int)ch).ToString("x2"));
            else sb.Append(ch);
        return sb.ToString();
    }
}

internal sealed class PeerConfig
{
    internal Key32 PublicKey;
    internal string Name = "";
    internal Endpoint Endpoint;            // unset (port 0) when the peer is only ever a responder
    internal string EndpointText = "";
    internal readonly List<IpPrefix> Allowed = new();
    internal readonly List<ulong> AllowedMacs = new();   // --allow-mac: with --mode tap|hub, the only source MACs it may use
    internal long KeepaliveMs = -1;        // -1: the node's keepalive
    internal bool Trusted;                 // from --trust: may connect, endpoint learned from the mesh
    internal Endpoint Tcp;                 // --peer-tcp: its --listen-tcp, for when UDP gets no answer
    internal bool Isolated;                // TOML isolated: reaches this node only; members are told to refuse it (§15)
    internal bool NameGiven;               // the config names it (else the name is the key's, or what it announces)
    internal string PskFile = "";          // TOML psk: a secret of this peer's own instead of the network's
    internal Key32 Psk;                    // what PskFile holds (when PskFile is set and not PskKept)
    internal bool PskKept;                 // a reload with the same PskFile: the node keeps the secret it holds
}

/// <summary>A parsed TOML value with the line it came from.</summary>
internal sealed class TomlValue
{
    internal enum Kind { String, Integer, Boolean, Array }
    internal Kind Type;
    internal string Str = "";
    internal long Int;
    internal bool Bool;
    internal List<TomlValue> Items = new();
    internal int Line;
}

/// <summary>The TOML subset Veil reads. Throws ConfigException("FILE:LINE: …").</summary>
internal sealed class TomlDoc
{
    internal readonly string File;
    internal readonly Dictionary<string, TomlValue> Root = new();
    internal readonly Dictionary<string, List<Dictionary<string, TomlValue>>> TableArrays = new();
    // Root holds the keys above the first [[table]] header; as in TOML, every key after a header belongs
    // to that entry until the next header, so node-wide keys must come first in the file.
    internal readonly Dictionary<string, int> TableLines = new();   // first line of each [[table]] entry, keyed "name#i"
    // [[network]] tables (§17.1): each is a document of its own, with its keys in Root and its
    // [[network.peer]] and [[network.filter]] entries as "peer" and "filter"; Line is its header's.
    internal readonly List<TomlDoc> Networks = new();
    internal int Line;
    // A config is a few KiB; a path to something large (a log, an image) is refused before it is read.
    private const int MaxFileLen = 1 << 20;

    private TomlDoc(string file) { File = file; }

    /// <summary>One network's document: the file's keys (the defaults of every network) with the
    /// network's own over them, and the network's tables. Its "name" is the network's, not the node's.</summary>
    internal static TomlDoc Merge(TomlDoc top, TomlDoc net)
    {
        var d = new TomlDoc(top.File) { Line = net.Line };
        foreach (var (k, v) in top.Root) d.Root[k] = v;
        foreach (var (k, v) in net.Root)
            if (k != "name") d.Root[k] = v;
        foreach (var (k, v) in net.TableArrays) d.TableArrays[k] = v;
        foreach (var (k, v) in net.TableLines) d.TableLines[k] = v;
        return d;
    }

    internal static TomlDoc Load(string path)
    {
        string text;
        if (Directory.Exists(path)) throw new ConfigException($"--config '{path}': a directory, not a file");
        try
        {
            using var fs = new FileStream(path, FileMode.Open, FileAccess.Read);
            if (fs.Length > MaxFileLen) throw new ConfigException($"--config '{path}': larger than {MaxFileLen >> 10} KiB");
            text = new StreamReader(fs).ReadToEnd();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException or NotSupportedException)
        {
            // Our own words, not e.Message: with UseSystemResourceKeys the runtime's texts are resource keys.
            throw new ConfigException($"--config '{path}': " + e switch
            {
                FileNotFoundException or DirectoryNotFoundException => "no such file",
                ArgumentException or NotSupportedException => "not a valid path",
                UnauthorizedAccessException => "permission denied (with --user, that user must be able to read it)",
                _ => "cannot read it",
            });
        }
        return Parse(text, Path.GetFileName(path));
    }

    internal static TomlDoc Parse(string text, string name)
    {
        var top = new TomlDoc(name);
        TomlDoc doc = top;                               // the document entries go to: the file's, or its last [[network]]'s
        Dictionary<string, TomlValue> table = top.Root;
        var p = new Parser(text, name);
        while (p.SkipBlankLines())
        {
            int line = p.Line;
            if (p.Peek() == '[')
            {
                // "[[" is tried before "[": the plain table form would otherwise swallow the first bracket.
                bool array = p.Match("[[");
                if (!array) p.Next();
                string key = p.BareKey();
                while (p.Match(".")) key += "." + p.BareKey();
                if (!p.Match(array ? "]]" : "]")) throw p.Error("expected ']' after the table name");
                p.EndOfLine();
                if (!array) throw new ConfigException($"{name}:{line}: table [{key}] is not known (tables of Veil are [[peer]])");
                if (key == "network")
                {
                    // A name that is both a key and a table could be read either way; refusing it keeps one meaning.
                    if (top.Root.ContainsKey(key)) throw new ConfigException($"{name}:{line}: '{key}' is already a key");
                    top.Networks.Add(doc = new TomlDoc(name) { Line = line });
                    table = doc.Root;
                    continue;
                }
                // As in TOML, what follows a [[network]] header is that network's: a [[peer]] there would
                // silently belong to no network, so it must say [[network.peer]].
                if (key.StartsWith("network.", StringComparison.Ordinal))
                {
                    if (doc == top) throw new ConfigException($"{name}:{line}: [[{key}]] must follow the [[network]] it belongs to");
                    key = key["network.".Length..];
                }
                else if (doc != top) throw new ConfigException($"{name}:{line}: [[{key}]] after a [[network]]: write [[network.{key}]] for that network's, or move it above the first [[network]]");
                if (doc.Root.ContainsKey(key)) throw new ConfigException($"{name}:{line}: '{key}' is already a key");
                if (!doc.TableArrays.TryGetValue(key, out var list)) doc.TableArrays[key] = list = new();
                table = new Dictionary<string, TomlValue>();
                doc.TableLines[key + "#" + list.Count] = line;
                list.Add(table);
                continue;
            }
            string k = p.BareKey();
            p.SkipSpaces();
            if (!p.Match("=")) throw p.Error($"expected '=' after key '{k}'");
            TomlValue v = p.Value();
            p.EndOfLine();
            // A repeated key is an error, not "last wins": with two values nobody can tell which one the operator
            // meant, and a silently ignored line is worse than a refused file.
            if (table.ContainsKey(k) || (table == doc.Root && doc.TableArrays.ContainsKey(k)))
                throw new ConfigException($"{name}:{line}: key '{k}' is given twice");
            v.Line = line;
            table[k] = v;
        }
        if (top.Networks.Count > 0 && top.TableArrays.Count > 0)
        {
            string t = "";
            foreach (string k in top.TableArrays.Keys) { t = k; break; }
            throw new ConfigException($"{name}:{top.TableLines[t + "#0"]}: with [[network]] tables, each [[{t}]] belongs to one: write [[network.{t}]] under it");
        }
        return top;
    }

    private sealed class Parser(string text, string name)
    {
        private int _i;
        // Only Next() steps over '\n' (every other advance stops before it), so Line is always the line of
        // _i and each error names the line the operator must look at.
        internal int Line = 1;

        internal ConfigException Error(string what) => new($"{name}:{Line}: {what}");
        internal char Peek() => _i < text.Length ? text[_i] : '\0';
        internal char Next()
        {
            char c = text[_i++];
            if (c == '\n') Line++;
            return c;
        }
        internal bool Match(string s)
        {
            if (string.CompareOrdinal(text, _i, s, 0, s.Length) != 0) return false;
            _i += s.Length;
            return true;
        }
        internal void SkipSpaces()
        {
            while (Peek() is ' ' or '\t') _i++;
        }
        private void SkipComment()
        {
            if (Peek() == '#') while (_i < text.Length && text[_i] != '\n') _i++;
        }
        // Skips blank and comment lines; false at the end of the text.
        internal bool SkipBlankLines()
        {
            while (true)
            {
                SkipSpaces();
                SkipComment();
                if (Peek() == '\r') _i++;
                if (Peek() == '\n') { Next(); continue; }
                return _i < text.Length;
            }
        }
        // A value must end its line (bar a comment): "mtu = 1400 1500" is refused, not read as 1400.
        internal void EndOfLine()
        {
            SkipSpaces();
            SkipComment();
            if (Peek() == '\r') _i++;
            if (_i < text.Length && Peek() != '\n') throw Error($"unexpected '{Peek()}' after the value");
        }
        internal string BareKey()
        {
            SkipSpaces();
            int start = _i;
            while (char.IsAsciiLetterOrDigit(Peek()) || Peek() is '_' or '-') _i++;
            if (_i == start) throw Error(Peek() == '\0' ? "unexpected end of file" : $"expected a key, found '{Peek()}'");
            return text[start.._i];
        }
        // Arrays may span lines and end with a comma; comments may sit between their items.
        private void SkipInArray()
        {
            while (true)
            {
                SkipSpaces();
                SkipComment();
                if (Peek() is '\r' or '\n') { Next(); continue; }
                return;
            }
        }
        private const int MaxArrayDepth = 8;             // Veil reads arrays of strings; nesting is only ever an error

        internal TomlValue Value(int depth = 0)
        {
            SkipSpaces();
            char c = Peek();
            if (c == '"') return new TomlValue { Type = TomlValue.Kind.String, Str = BasicString() };
            if (c == '\'') return new TomlValue { Type = TomlValue.Kind.String, Str = LiteralString() };
            if (c == '[')
            {
                if (depth >= MaxArrayDepth) throw Error("arrays nested too deep");
                Next();
                var arr = new TomlValue { Type = TomlValue.Kind.Array };
                while (true)
                {
                    SkipInArray();
                    if (Peek() == ']') { Next(); return arr; }
                    // Far above any real list (allowed_ips, claims); past it the file is a mistake, not a config.
                    if (arr.Items.Count >= 4096) throw Error("array too long");
                    arr.Items.Add(Value(depth + 1));
                    SkipInArray();
                    if (Peek() == ',') { Next(); continue; }
                    if (Peek() == ']') { Next(); return arr; }
                    throw Error("expected ',' or ']' in the array");
                }
            }
            // Integers are decimal with TOML's optional '_' separators (1_000); hex, floats and dates are not in
            // the subset, and "0x10" fails at EndOfLine on the 'x' rather than being read as 0.
            if (Match("true")) return new TomlValue { Type = TomlValue.Kind.Boolean, Bool = true };
            if (Match("false")) return new TomlValue { Type = TomlValue.Kind.Boolean, Bool = false };
            int start = _i;
            if (c is '+' or '-') _i++;
            while (char.IsAsciiDigit(Peek()) || Peek() == '_') _i++;
            string digits = text[start.._i].Replace("_", "");
            if (_i > start && long.TryParse(digits, System.Globalization.NumberStyles.AllowLeadingSign, null, out long n))
                return new TomlValue { Type = TomlValue.Kind.Integer, Int = n };
            throw Error(c == '\0' || c == '\n' ? "missing value" : "expected a string, an integer, true, false or an array");
        }
        private string BasicString()
        {
            Next();
            var sb = new StringBuilder();
            while (true)
            {
                if (_i >= text.Length || Peek() == '\n') throw Error("unterminated string");
                char c = Next();
                if (c == '"') return sb.ToString();
                if (c != '\\') { sb.Append(c); continue; }
                if (_i >= text.Length) throw Error("unterminated string");
                char e = Next();
                switch (e)
                {
                    case '"': sb.Append('"'); break;
                    case '\\': sb.Append('\\'); break;
                    case 'n': sb.Append('\n'); break;
                    case 't': sb.Append('\t'); break;
                    case 'r': sb.Append('\r'); break;
                    // Only the 4-digit \u form; \U (8 digits) is not in the subset and falls to "unknown escape".
                    case 'u':
                        if (_i + 4 > text.Length || !ushort.TryParse(text.AsSpan(_i, 4), System.Globalization.NumberStyles.AllowHexSpecifier, null, out ushort u))
                            throw Error("bad \\u escape");
                        sb.Append((char)u);
                        _i += 4;
                        break;
                    default: throw Error($"unknown escape '\\{e}'");
                }
            }
        }
        private string LiteralString()
        {
            Next();
            int start = _i;
            while (_i < text.Length && Peek() != '\'' && Peek() != '\n') _i++;
            if (Peek() != '\'') throw Error("unterminated string");
            string s = text[start.._i];
            _i++;
            return s;
        }
    }
}

internal sealed class UpConfig
{
    internal Key32 PrivateKey, PublicKey;
    internal Key32 Psk;                    // all zero when no network secret is given (Noise: 32 zero bytes)
    internal string KeyFile = "", PskFile = "";
    internal readonly List<string> AcceptPskFiles = new();   // secrets also accepted from peers (a rotation)
    internal Key32[] AcceptPsks = [];
    internal bool SecretsRead;             // Psk and AcceptPsks hold what the files say (else: unchanged, not read)
    internal byte[]? AdminKey;             // P-256 public key (x ‖ y) whose signed revocations this node obeys
    internal string? RevocationsPath;      // where revocations are kept; default: "revoked" beside --config
    internal string? StatePath;            // the members this node learned (MemberState); default: "state" beside --config
    internal string? BeaconStore, BeaconLoad;  // FILE or "|PROGRAM ARG..." (Beacon)
    internal IPAddress ListenAddress = IPAddress.Any;
    internal int ListenPort = Tune.DefaultListenPort;
    internal readonly List<IfAddress> Addresses = new();
    internal string TunName = "veil0";
    internal readonly List<PeerConfig> Peers = new();
    internal int Mtu;                      // 0: derive from the underlay
    internal int Workers;                  // 0: one per core where there are more than 2, else 1
    internal long PersistentKeepaliveMs;   // 0: off
    internal long RekeyAfterTimeMs = Spec.RekeyAfterTimeMs;
    internal string ControlPath = Tune.DefaultControlPath;
    internal IPAddress? MgmtAddress = IPAddress.Loopback;   // null: management HTTP off
    internal int MgmtPort = 7777;
    internal readonly List<IpPrefix> MgmtAcl = new();
    internal int MaxSessions = Tune.DefaultMaxSessions;
    internal int HandshakeRate = Tune.DefaultHandshakeRate;
    internal int HandshakeRatePerSource = Tune.DefaultHandshakeRatePerSource;
    internal LogLevel LogLevel = LogLevel.Info;
    internal bool LogJson, LogNoTimestamps;
    internal string? User;
    internal string Cipher = "auto";
    internal bool Fec = true;              // --fec auto|off: parity records while a peer reports loss (§12.1)
    internal L2Mode Mode;                  // --mode tun|tap|hub: IP packets, or Ethernet frames switched or flooded (§8.1)
    internal string? Bridge;               // --bridge: the bridge the TAP is kept a port of
    internal bool CheckOnly;
    internal string? ConfigPath;
    internal string? NetworkName;          // the [[network]] this is, of several in the file (null: the file has none)
    internal string? HostControlPath;      // with NetworkName: the node's control socket (ControlPath is the network's)
    // Mesh (§15): membership policy, this node's name and claims, what it accepts from others.
    internal bool Mesh;                    // network policy: anyone who completes the handshake with the psk
    internal string Name = "";             // announced to the mesh; "" = the first characters of the key
    internal readonly List<IpPrefix> Networks = new();   // default: the networks of Addresses
    internal readonly List<IpPrefix> Claims = new();
    internal readonly List<IpPrefix> Accept = new();
    internal int Metric = Tune.DefaultMetric;
    internal bool Relay = true;            // carry records between members that cannot reach each other (§15)
    internal int RelayRateMbit = Tune.DefaultRelayRateMbit;
    internal long HealthzGraceMs = 120_000;   // /healthz answers 503 once no peer has been up this long
    internal readonly Dictionary<string, string> HookPrograms = new();   // --hook EVENT=PROGRAM
    internal bool PortMapping = true;      // ask the gateway to forward our port (PortMapper)
    internal bool FixRpFilter;             // loosen a strict reverse-path filter while we run (Sysctls)
    internal bool Exit;                    // --exit: offer members a way out (Gateway)
    internal readonly List<string> ExitFor = new();   // --exit-for PATTERN|KEY: the members the exit serves (none given: all)
    internal string? ExitNode;             // --exit-node NAME: send what has no other route to that member
    internal bool ExitAllowLan;            // --exit-allow-lan: the main table's routes (the LAN) stay outside the exit
    internal bool AddressAuto;             // --address auto: one address per --network, from the key (AutoAddress)
    internal bool Isolate;                 // --isolate: peers cannot reach each other through this node
    internal readonly List<string> Filters = new();   // --filter RULE (PacketFilter)
    internal IPAddress? TcpListenAddress;  // --listen-tcp: the same records over TCP (TcpLinks)
    internal int TcpListenPort;
    private bool _keepaliveGiven;

    // Keys a running daemon cannot change; reload refuses (exit 3) when one of them differs.
    internal static readonly string[] RestartKeys = ["key", "listen", "address", "tun", "mtu", "control", "mgmt", "user", "cipher", "mesh", "name", "network", "workers", "revocations", "port_mapping", "listen_tcp", "state", "beacon_store", "beacon_load", "fix_rp_filter", "exit", "mode", "bridge"];
    // (isolate is reloadable: it is a check on the packet path, no device or socket changes.)

    private static readonly string[] Keys =
    [
        "key", "psk", "listen", "address", "tun", "mtu", "keepalive", "rekey_after", "control", "mgmt", "mgmt_acl",
        "max_sessions", "handshake_rate", "handshake_rate_per_source", "log_level", "log_format", "user", "cipher",
        "mesh", "trust", "name", "network", "claim", "accept", "metric", "workers", "accept_psk", "admin", "revocations",
        "relay", "relay_rate", "port_mapping", "listen_tcp", "state", "beacon_store", "beacon_load", "healthz_grace", "hook",
        "fix_rp_filter", "exit", "exit_for", "exit_node", "exit_allow_lan", "isolate", "filter", "fec", "mode", "bridge",
    ];
    internal static readonly string[] BoolKeys = ["mesh", "relay", "port_mapping", "fix_rp_filter", "exit", "exit_allow_lan", "isolate"];
    private static readonly string[] ListKeys = ["filter", "exit_for", "address", "mgmt_acl", "trust", "network", "claim", "accept", "accept_psk", "hook"];
    private static readonly string[] PeerKeys = ["name", "public_key", "endpoint", "allowed_ips", "allowed_macs", "keepalive", "tcp", "isolated", "psk"];

    /// <summary>Where a value came from, for the one-line error: "--mtu" or "veil.toml:12: key 'mtu'".</summary>
    // A flag error quotes the flag as typed; a file error leads with FILE:LINE so editors can jump to it.
    private readonly record struct Src(string Text, bool IsFlag)
    {
        internal ConfigException Bad(string value, string what) =>
            new(IsFlag ? $"{Text} '{value}' {what}" : $"{Text}: '{value}' {what}");
    }

    /// <summary>Parses `veil up` arguments (args[start..]) and the --config file they name: one network's
    /// config (a network's own reload picks its [[network]] by running's name).</summary>
    internal static UpConfig Load(string[] args, int start, UpConfig? running = null)
    {
        List<UpConfig> all = LoadAll(args, start, running);
        if (all.Count == 1 && all[0].NetworkName == null) return all[0];
        UpConfig? mine = running?.NetworkName is string name ? all.Find(x => x.NetworkName == name) : null;
        foreach (UpConfig x in all)
            if (x != mine) x.Wipe();
        if (mine != null) return mine;
        string file = all[0].ConfigPath!;
        throw new ConfigException(running?.NetworkName is string gone
            ? $"{file} no longer has [[network]] '{gone}': adding or removing a network needs a restart"
            : $"{file} holds [[network]] tables: only 'veil up' runs those");
    }

    // Keys of the process, not of one network: they go above the first [[network]] (or are flags).
    internal static readonly string[] NodeWideKeys = ["user", "log_level", "log_format", "control", "mgmt", "mgmt_acl", "healthz_grace"];

    /// <summary>Every network the arguments and the file describe: one without [[network]] tables
    /// (NetworkName null), else one per table, checked to be apart from each other.</summary>
    internal static List<UpConfig> LoadAll(string[] args, int start, UpConfig? running = null)
    {
        var c = new UpConfig();
        var (flags, flagPeers) = c.ParseFlags(args, start);
        // ApplyFile skips every key a flag has set, so the file cannot undo a flag applied before it.
        TomlDoc? doc = c.ConfigPath != null ? TomlDoc.Load(c.ConfigPath) : null;
        if (doc == null || doc.Networks.Count == 0)
        {
            c.Build(doc, flags, flagPeers, running);
            return [c];
        }
        // Flags alone describe one network: with several, a flag could only mean all of them, and most
        // (tun, listen, address) cannot be the same in two.
        foreach (var (key, _) in flags)
            if (Array.IndexOf(NodeWideKeys, key) < 0)
                throw new ConfigException($"--{key.Replace('_', '-')}: {doc.File} holds [[network]] tables; set {key} in the one it belongs to (flags here: --{string.Join(", --", NodeWideKeys).Replace('_', '-')})");
        if (flagPeers.Count > 0) throw new ConfigException($"--peer: {doc.File} holds [[network]] tables; add the peer as [[network.peer]] of its network");
        if (doc.Networks.Count > Tune.MaxNetworks) throw new ConfigException($"{doc.File}: at most {Tune.MaxNetworks} [[network]] tables");
        var all = new List<UpConfig>();
        try
        {
            foreach (TomlDoc net in doc.Networks)
            {
                foreach (var (k, v) in net.Root)
                    if (Array.IndexOf(NodeWideKeys, k) >= 0) throw new ConfigException($"{doc.File}:{v.Line}: key '{k}' is the node's, not a network's: put it above the first [[network]]");
                if (!net.Root.TryGetValue("name", out TomlValue? nv)) throw new ConfigException($"{doc.File}:{net.Line}: [[network]] needs a name");
                var src = new Src($"{doc.File}:{nv.Line}: key 'name'", false);
                string name = Scalar(src, nv, false);
                // The name is the default interface, part of the control socket's path and a metric label.
                if (name.Length is 0 or > 15 || name.AsSpan().IndexOfAnyExcept(NetworkNameChars) >= 0)
                    throw src.Bad(name, "must be 1 to 15 letters, digits, '-' or '_'");
                if (all.Exists(x => x.NetworkName == name)) throw src.Bad(name, "names another [[network]] too");
                var n = new UpConfig { CheckOnly = c.CheckOnly, ConfigPath = c.ConfigPath, NetworkName = name, TunName = name };
                all.Add(n);
                n.Build(TomlDoc.Merge(doc, net), flags, [], running?.NetworkName == name ? running : null);
                n.HostControlPath = n.ControlPath;
                n.ControlPath = NetworkControlPath(n.ControlPath, name);
            }
            CheckApart(all, doc);
        }
        catch (ConfigException)
        {
            foreach (UpConfig x in all) x.Wipe();
            throw;
        }
        return all;
    }

    private static readonly System.Buffers.SearchValues<char> NetworkNameChars =
        System.Buffers.SearchValues.Create("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_");

    /// <summary>A network's own control socket: "/var/run/veil.sock" → "/var/run/veil.NAME.sock".</summary>
    internal static string NetworkControlPath(string basePath, string name) =>
        basePath.EndsWith(".sock", StringComparison.Ordinal) ? basePath[..^5] + "." + name + ".sock" : basePath + "." + name;

    // What two networks of one daemon may not share: a packet must never be able to cross between them.
    private static void CheckApart(List<UpConfig> all, TomlDoc doc)
    {
        for (int i = 0; i < all.Count; i++)
            for (int j = 0; j < i; j++)
            {
                UpConfig a = all[i], b = all[j];
                string both = $"{doc.File}: [[network]] '{a.NetworkName}' and '{b.NetworkName}'";
                if (a.TunName == b.TunName) throw new ConfigException($"{both} both use interface {a.TunName}");
                if (a.ListenPort != 0 && a.ListenPort == b.ListenPort) throw new ConfigException($"{both} both listen on port {a.ListenPort}");
                if (a.TcpListenAddress != null && b.TcpListenAddress != null && a.TcpListenPort != 0 && a.TcpListenPort == b.TcpListenPort)
                    throw new ConfigException($"{both} both listen on TCP port {a.TcpListenPort}");
                foreach (IpPrefix pa in (List<IpPrefix>)[.. a.Networks, .. a.Claims])
                    foreach (IpPrefix pb in (List<IpPrefix>)[.. b.Networks, .. b.Claims])
                        if (pa.Overlaps(pb)) throw new ConfigException($"{both} overlap: {pa} and {pb}");
                if (a.StatePath != null && a.StatePath == b.StatePath) throw new ConfigException($"{both} both keep their state in {a.StatePath}");
                if (a.RevocationsPath != null && a.RevocationsPath == b.RevocationsPath) throw new ConfigException($"{both} both keep revocations in {a.RevocationsPath}");
                // The exit's policy rules and table are the host's one set.
                if (a.ExitNode != null && b.ExitNode != null) throw new ConfigException($"{both} both set exit_node: one network may use an exit");
            }
    }

    /// <summary>Zeroes what a config read of keys and secrets, for a config that is not used.</summary>
    internal void Wipe()
    {
        PrivateKey.Clear();
        Psk.Clear();
        foreach (PeerConfig pc in Peers) pc.Psk.Clear();
        foreach (Key32 k in AcceptPsks) k.Clear();
    }

    private (List<(string Key, string Value)>, List<PeerConfig>) ParseFlags(string[] args, int start)
    {
        var flags = new List<(string Key, string Value)>();
        var flagPeers = new List<PeerConfig>();
        UpConfig c = this;
        PeerConfig? lastPeer = null;
        for (int i = start; i < args.Length; i++)
        {
            string flag = args[i], value;
            // Switches take no value, so they are matched before the "--flag value" form would eat the next word.
            if (flag == "--check") { c.CheckOnly = true; continue; }
            if (flag == "--mesh") { flags.Add(("mesh", "true")); continue; }
            if (flag is "--relay" or "--no-relay") { flags.Add(("relay", flag == "--relay" ? "true" : "false")); continue; }
            if (flag is "--port-mapping" or "--no-port-mapping") { flags.Add(("port_mapping", flag == "--port-mapping" ? "true" : "false")); continue; }
            if (flag == "--fix-rp-filter") { flags.Add(("fix_rp_filter", "true")); continue; }
            if (flag == "--exit") { flags.Add(("exit", "true")); continue; }
            if (flag == "--exit-allow-lan") { flags.Add(("exit_allow_lan", "true")); continue; }
            if (flag == "--isolate") { flags.Add(("isolate", "true")); continue; }
            int eq = flag.IndexOf('=');
            // Both "--mtu=1400" and "--mtu 1400"; the name is checked again after the split, since the "=" form
            // skips the check in the else branch.
            if (flag.StartsWith("--") && eq > 0) { value = flag[(eq + 1)..]; flag = flag[..eq]; }
            else
            {
                if (!IsFlag(flag)) throw UnknownFlag(flag);
                if (i + 1 >= args.Length) throw new ConfigException($"{flag} needs a value");
                value = args[++i];
            }
            if (!IsFlag(flag)) throw UnknownFlag(flag);
            var src = new Src(flag, true);
            switch (flag)
            {
                case "--config": c.ConfigPath = value; break;
                case "--peer":
                    lastPeer = ParsePeer(src, value);
                    if (flagPeers.Exists(p => p.PublicKey.EqualsCt(lastPeer.PublicKey)))
                        throw new ConfigException($"--peer {lastPeer.PublicKey.Short()} is given twice");
                    flagPeers.Add(lastPeer);
                    break;
                // --allow and --peer-tcp attach to the --peer just before them, as WireGuard's allowed-ips does in
                // wg(8): argv order is the only grouping a command line has.
                case "--allow":
                    if (lastPeer == null) throw new ConfigException("--allow must follow the --peer it belongs to");
                    lastPeer.Allowed.Add(ParsePrefix(src, value));
                    break;
                case "--allow-mac":
                    if (lastPeer == null) throw new ConfigException("--allow-mac must follow the --peer it belongs to");
                    lastPeer.AllowedMacs.Add(ParseMac(src, value));
                    break;
                case "--peer-tcp":
                    if (lastPeer == null) throw new ConfigException("--peer-tcp must follow the --peer it belongs to");
                    var (tip, tport) = ParseAddressPort(src, value);
                    lastPeer.Tcp = Endpoint.FromIp(tip, tport);
                    break;
                default: flags.Add((flag[2..].Replace('-', '_'), value)); break;
            }
        }
        return (flags, flagPeers);
    }

    private void Build(TomlDoc? doc, List<(string Key, string Value)> flags, List<PeerConfig> flagPeers, UpConfig? running)
    {
        foreach (var (key, value) in flags) Apply(key, new Src("--" + key.Replace('_', '-'), true), value);
        if (doc != null) ApplyFile(doc, flags);
        // A --peer replaces the file's [[peer]] of the same key, so one peer can be overridden from the
        // command line without editing the file.
        foreach (PeerConfig fp in flagPeers)
        {
            Peers.RemoveAll(p => p.PublicKey.EqualsCt(fp.PublicKey));
            Peers.Add(fp);
        }
        Finish(running);
    }

    // A flag wins over the file's key; for lists (address, claim, …) the flags replace the file's list.
    private void ApplyFile(TomlDoc doc, List<(string Key, string Value)> flags)
    {
        foreach (var (key, v) in doc.Root)
        {
            if (Array.IndexOf(Keys, key) < 0) throw new ConfigException($"{doc.File}:{v.Line}: unknown key '{key}'{DidYouMean(key, Keys)}");
            if (flags.Exists(f => f.Key == key)) continue;
            var src = new Src($"{doc.File}:{v.Line}: key '{key}'", false);
            if (Array.IndexOf(ListKeys, key) >= 0)
            {
                foreach (TomlValue item in ListOf(src, v)) Apply(key, src, FromFile(key, item.Str));
                continue;
            }
            if (Array.IndexOf(BoolKeys, key) >= 0)
            {
                if (v.Type != TomlValue.Kind.Boolean) throw new ConfigException($"{src.Text}: expected true or false");
                Apply(key, src, v.Bool ? "true" : "false");
                continue;
            }
            Apply(key, src, FromFile(key, Scalar(src, v, key is "mtu" or "keepalive" or "rekey_after" or "max_sessions" or "handshake_rate" or "handshake_rate_per_source" or "metric" or "workers" or "relay_rate" or "healthz_grace")));
        }
        foreach (var (table, entries) in doc.TableArrays)
        {
            if (table is not ("peer" or "filter")) throw new ConfigException($"{doc.File}:{doc.TableLines[table + "#0"]}: table [[{table}]] is not known (use [[peer]] or [[filter]])");
            for (int i = 0; i < entries.Count; i++)
                if (table == "peer") Peers.Add(FilePeer(doc, entries[i], doc.TableLines["peer#" + i]));
                else if (!flags.Exists(f => f.Key == "filter"))          // --filter replaces the file's rules, tables too
                {
                    int line = doc.TableLines["filter#" + i];
                    string rule = FileFilter(doc, entries[i], line);
                    try { Apply("filter", new Src($"{doc.File}:{line}: [[filter]]", false), rule); }
                    catch (ConfigException e) when (!e.Message.StartsWith(doc.File, StringComparison.Ordinal)) { throw new ConfigException($"{doc.File}:{line}: [[filter]]: {e.Message}"); }
                }
        }
    }

    private static readonly string[] FilterKeys = ["action", "direction", "proto", "port", "peer"];

    // [[filter]] action = "allow"|"deny", direction = "in"|"out", proto = "tcp"|"udp"|"icmp"|"any",
    // port = 22 or "1000-2000", peer = "admin-*": the one-line rule the flag takes, built from its parts.
    private static string FileFilter(TomlDoc doc, Dictionary<string, TomlValue> t, int line)
    {
        foreach (var (k, v) in t)
            if (Array.IndexOf(FilterKeys, k) < 0) throw new ConfigException($"{doc.File}:{v.Line}: unknown key '{k}' in [[filter]]{DidYouMean(k, FilterKeys)}");
        string Part(string k, bool integerToo)
        {
            if (!t.TryGetValue(k, out TomlValue? v)) return "";
            var src = new Src($"{doc.File}:{v.Line}: key '{k}'", false);
            string text = integerToo && v.Type == TomlValue.Kind.Integer ? Scalar(src, v, true) : Scalar(src, v, false);
            if (text.Length == 0 || text.Contains(' ')) throw new ConfigException($"{src.Text}: expected one word");
            return text;
        }
        string direction = Part("direction", false);
        if (direction.Length == 0) throw new ConfigException($"{doc.File}:{line}: [[filter]] needs a direction (\"in\" or \"out\")");
        string proto = Part("proto", false), port = Part("port", true), peer = Part("peer", false);
        string rule = $"{Part("action", false)} {direction} {(proto.Length > 0 ? proto : "any")} {port} {(peer.Length > 0 ? (direction == "out" ? "to " : "from ") + peer : "")}";
        return string.Join(' ', rule.Split(' ', StringSplitOptions.RemoveEmptyEntries));
    }

    // A relative path in the file is relative to the file (as in nginx or a systemd unit): under procd
    // or systemd the working directory is /, and the file's own directory is where its keys live.
    // Flags stay relative to the working directory, as a shell user expects.
    private string FromFile(string key, string value)
    {
        bool path = key is "key" or "psk" or "accept_psk" or "revocations" or "state" or "control"
                    || key is "beacon_store" or "beacon_load" && !value.StartsWith('|');
        if (!path || value.Length == 0 || Path.IsPathRooted(value) || ConfigPath == null) return value;
        return Path.Combine(Path.GetDirectoryName(Path.GetFullPath(ConfigPath))!, value);
    }

    private PeerConfig FilePeer(TomlDoc doc, Dictionary<string, TomlValue> t, int line)
    {
        foreach (var (k, v) in t)
            if (Array.IndexOf(PeerKeys, k) < 0) throw new ConfigException($"{doc.File}:{v.Line}: unknown key '{k}' in [[peer]]{DidYouMean(k, PeerKeys)}");
        // The entry's header line is named here: the missing key has no line of its own.
        if (!t.TryGetValue("public_key", out TomlValue? pk)) throw new ConfigException($"{doc.File}:{line}: [[peer]] needs a public_key");
        Src S(string k) => new($"{doc.File}:{t[k].Line}: key '{k}'", false);
        PeerConfig p = ParsePeer(S("public_key"), Scalar(S("public_key"), pk, false));
        if (t.TryGetValue("endpoint", out TomlValue? ep)) p = WithEndpoint(S("endpoint"), p, Scalar(S("endpoint"), ep, false));
        if (t.TryGetValue("allowed_ips", out TomlValue? al))
            foreach (TomlValue item in ListOf(S("allowed_ips"), al)) p.Allowed.Add(ParsePrefix(S("allowed_ips"), item.Str));
        if (t.TryGetValue("allowed_macs", out TomlValue? am))
            foreach (TomlValue item in ListOf(S("allowed_macs"), am)) p.AllowedMacs.Add(ParseMac(S("allowed_macs"), item.Str));
        if (t.TryGetValue("keepalive", out TomlValue? ka)) p.KeepaliveMs = ParseInt(S("keepalive"), Scalar(S("keepalive"), ka, true), 0, 3600) * 1000L;
        if (t.TryGetValue("name", out TomlValue? nm)) { p.Name = ParseName(S("name"), Scalar(S("name"), nm, false)); p.NameGiven = true; }
        if (t.TryGetValue("psk", out TomlValue? ps)) p.PskFile = FromFile("psk", Scalar(S("psk"), ps, false));   // read by Finish
        if (t.TryGetValue("isolated", out TomlValue? iso))
            p.Isolated = iso.Type == TomlValue.Kind.Boolean ? iso.Bool : throw new ConfigException($"{S("isolated").Text}: expected true or false");
        if (t.TryGetValue("tcp", out TomlValue? tc))
        {
            var (tip, tport) = ParseAddressPort(S("tcp"), Scalar(S("tcp"), tc, false));
            p.Tcp = Endpoint.FromIp(tip, tport);
        }
        return p;
    }

    // Integers come back as invariant-culture text so the file and the flags go through one Apply and
    // one set of range checks.
    private static string Scalar(Src src, TomlValue v, bool integer)
    {
        if (integer && v.Type == TomlValue.Kind.Integer) return v.Int.ToString(System.Globalization.CultureInfo.InvariantCulture);
        if (!integer && v.Type == TomlValue.Kind.String) return v.Str;
        throw new ConfigException($"{src.Text}: expected {(integer ? "an integer" : "a string")}");
    }

    private static List<TomlValue> ListOf(Src src, TomlValue v)
    {
        if (v.Type != TomlValue.Kind.Array || v.Items.Exists(i => i.Type != TomlValue.Kind.String))
            throw new ConfigException($"{src.Text}: expected an array of strings");
        return v.Items;
    }

    private void Apply(string key, Src src, string value)
    {
        switch (key)
        {
            case "key": KeyFile = value; break;
            case "psk": PskFile = value; break;
            case "accept_psk": AcceptPskFiles.Add(value); break;
            // The key is checked to be a point on P-256 here, so a bad admin key fails `veil up --check`, not
            // the first revocation that arrives.
            case "admin":
                byte[] admin = new byte[AdminSignature.PublicKeyLen];
                if (!Convert.TryFromBase64String(value, admin, out int n) || n != admin.Length || !AdminSignature.IsPublicKey(admin))
                    throw src.Bad(value, "is not an admin public key (the base64 line 'veil adminpub' prints)");
                AdminKey = admin;
                break;
            case "revocations": RevocationsPath = value.Length > 0 ? value : throw src.Bad(value, "must be a file path"); break;
            case "state": StatePath = value.Length > 0 ? value : throw src.Bad(value, "must be a file path"); break;
            case "beacon_store" or "beacon_load":
                if (value.Trim('|', ' ').Length == 0) throw src.Bad(value, "must be a file path or |PROGRAM [ARG...]");
                if (key == "beacon_store") BeaconStore = value; else BeaconLoad = value;
                break;
            case "listen": (ListenAddress, ListenPort) = ParseAddressPort(src, value); break;
            case "listen_tcp": (TcpListenAddress, TcpListenPort) = ParseAddressPort(src, value); break;
            case "address":
                if (value == "auto") { AddressAuto = true; break; }
                if (!IfAddress.TryParse(value, out IfAddress a)) throw src.Bad(value, "is not an address with a prefix length (e.g. 100.64.0.1/24), or auto");
                Addresses.Add(a);
                break;
            case "tun": TunName = ParseTunName(src, value); break;
            case "bridge": Bridge = ParseTunName(src, value); break;
            case "mtu": Mtu = ParseInt(src, value, Tune.MinMtu, Tune.MaxMtu); break;
            case "keepalive": PersistentKeepaliveMs = ParseInt(src, value, 0, 3600) * 1000L; _keepaliveGiven = true; break;
            // Only shorter than the protocol's 120 s: both ends drop a session at RejectAfterTimeMs (180 s)
            // whatever is configured, and the time between the two is the margin a rekey has under loss.
            case "rekey_after": RekeyAfterTimeMs = ParseInt(src, value, 1, (int)(Spec.RekeyAfterTimeMs / 1000)) * 1000L; break;
            // The path must fit sockaddr_un's sun_path (108 bytes with its NUL, Libc.WriteSockaddrUn).
            case "control":
                if (value.Length is 0 or > 99) throw src.Bad(value, "must be a path of 1 to 99 characters");
                ControlPath = value;
                break;
            case "mgmt":
                if (value == "off") MgmtAddress = null;
                else (MgmtAddress, MgmtPort) = ParseAddressPort(src, value);
                break;
            case "mgmt_acl":
                foreach (string part in value.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries))
                    MgmtAcl.Add(ParsePrefix(src, part));
                break;
            case "max_sessions": MaxSessions = ParseInt(src, value, 1, Tune.MaxPeers * 4); break;
            case "handshake_rate": HandshakeRate = ParseInt(src, value, 1, 100_000); break;
            case "handshake_rate_per_source": HandshakeRatePerSource = ParseInt(src, value, 1, 100_000); break;
            case "log_level":
                if (!Log.TryParseLevel(value, out LogLevel)) throw src.Bad(value, "must be one of error, warn, info, debug");
                break;
            case "log_format":
                if (value is not ("text" or "json" or "plain")) throw src.Bad(value, "must be text, json or plain (text without timestamps)");
                LogJson = value == "json";
                LogNoTimestamps = value == "plain";
                break;
            case "user": User = ParseName(src, value); break;
            case "mesh": Mesh = ParseBool(src, value); break;
            case "relay": Relay = ParseBool(src, value); break;
            case "port_mapping": PortMapping = ParseBool(src, value); break;
            case "fix_rp_filter": FixRpFilter = ParseBool(src, value); break;
            case "exit": Exit = ParseBool(src, value); break;
            case "exit_node": ExitNode = Key32.TryParseBase64(value, out _) ? value : ParseName(src, value); break;
            case "exit_for":
                if (!Key32.TryParseBase64(value, out _) && !PacketFilter.IsPattern(value))
                    throw src.Bad(value, "must be a peer name, a name pattern with '*', or a public key");
                if (ExitFor.Count >= Tune.MaxFilterRules) throw src.Bad(value, $"is one too many (at most {Tune.MaxFilterRules})");
                ExitFor.Add(value);
                break;
            case "exit_allow_lan": ExitAllowLan = ParseBool(src, value); break;
            case "isolate": Isolate = ParseBool(src, value); break;
            case "filter":
                PacketFilter.Parse(value);                // refused here, with its reason, not at the first packet
                if (Filters.Count >= Tune.MaxFilterRules) throw src.Bad(value, $"is one rule too many (at most {Tune.MaxFilterRules})");
                Filters.Add(value);
                break;
            case "relay_rate": RelayRateMbit = ParseInt(src, value, 1, 100_000); break;
            case "healthz_grace": HealthzGraceMs = ParseInt(src, value, 0, 86_400) * 1000L; break;
            case "hook":
            {
                int eq = value.IndexOf('=');
                string ev = eq > 0 ? value[..eq] : "", program = eq > 0 ? value[(eq + 1)..] : "";
                if (Array.IndexOf(Hooks.Events, ev) < 0 && ev != Hooks.AllEvents) throw src.Bad(value, $"must be EVENT=PROGRAM, EVENT one of {string.Join(", ", Hooks.Events)} or all");
                if (!Path.IsPathRooted(program) || !File.Exists(program)) throw src.Bad(value, "needs the absolute path of a program that exists (it runs without a shell)");
                if (HookPrograms.ContainsKey(ev)) throw src.Bad(value, $"gives a second hook for {ev}");
                HookPrograms[ev] = program;
                break;
            }
            case "trust":
                PeerConfig t = ParsePeer(src, value);
                if (t.EndpointText.Length > 0) throw src.Bad(value, "must be a public key alone (use --peer for a key with an endpoint)");
                t.Trusted = true;
                Peers.Add(t);
                break;
            case "name": Name = ParseName(src, value); break;
            case "network": Networks.Add(ParsePrefix(src, value)); break;
            case "claim": Claims.Add(ParsePrefix(src, value)); break;
            case "accept": Accept.Add(ParsePrefix(src, value)); break;
            // A claim's metric travels as 16 bits in the exchange message (§15).
            case "metric": Metric = ParseInt(src, value, 0, 65535); break;
            case "workers": Workers = ParseInt(src, value, 0, Tune.MaxWorkers); break;
            case "fec":
                if (value is not ("auto" or "off")) throw src.Bad(value, "must be auto or off");
                Fec = value == "auto";
                break;
            case "mode":
                Mode = value switch { "tun" => L2Mode.Tun, "tap" => L2Mode.Tap, "hub" => L2Mode.Hub, _ => throw src.Bad(value, "must be tun, tap or hub") };
                break;
            case "cipher":
                if (value is not ("auto" or "chacha20-poly1305" or "aes-256-gcm")) throw src.Bad(value, "must be auto, chacha20-poly1305 or aes-256-gcm");
                // Checked at parse time so `veil up --check` reports it, not the first handshake.
                if (value == "aes-256-gcm" && !Aead.IsSupported(AeadKind.Aes256Gcm)) throw src.Bad(value, "is not supported by this system's crypto library");
                Cipher = value;
                break;
        }
    }

    // Checks that need every value: required keys, key files, duplicates, the derived MTU.
    // On reload (running set) key files are not read again: the daemon may have dropped the rights
    // to read them, and a changed path is a restart anyway. Nor is an implicit MTU derived again.
    private void Finish(UpConfig? running)
    {
        if (KeyFile.Length == 0) throw new ConfigException("--key FILE is required (create one with 'veil genkey > FILE; chmod 600 FILE')");
        if (running == null || running.KeyFile != KeyFile)
        {
            PrivateKey = ReadKeyFile("--key", KeyFile);
            X25519.PublicKey(PublicKey, PrivateKey);
        }
        else PublicKey = running.PublicKey;
        // The network secrets are read again only when their files change (SecretsRead): rotating
        // the secret is a reload (README: rotating the network secret).
        SecretsRead = running == null || running.PskFile != PskFile || string.Join('\n', running.AcceptPskFiles) != string.Join('\n', AcceptPskFiles);
        if (SecretsRead)
        {
            if (PskFile.Length > 0) Psk = ReadKeyFile("--psk", PskFile);
            AcceptPsks = AcceptPskFiles.ConvertAll(f => ReadKeyFile("--accept-psk", f)).ToArray();
        }
        // A peer's own secret, as the network's: read when its file name is new (a reload after
        // --user could not read it again); the node keeps what it holds otherwise (PskKept).
        foreach (PeerConfig pc in Peers)
        {
            if (pc.PskFile.Length == 0) continue;
            if (running != null && running.Peers.Exists(r => r.PublicKey.EqualsCt(pc.PublicKey) && r.PskFile == pc.PskFile)) pc.PskKept = true;
            else pc.Psk = ReadKeyFile($"peer {(pc.Name.Length > 0 ? pc.Name : pc.PublicKey.DefaultName())}: psk", pc.PskFile);
        }
        // The defaults beside --config keep a node's files together; without --config (flags only) there is
        // no place to default to, and revocations and learned members are then not saved across restarts.
        if (RevocationsPath == null && ConfigPath != null) RevocationsPath = BesideConfig("revoked");
        if ((BeaconStore != null || BeaconLoad != null) && PskFile.Length == 0) throw new ConfigException("--beacon-store and --beacon-load need --psk FILE: beacons are sealed with the network secret");
        if (StatePath == null && ConfigPath != null && Mesh) StatePath = BesideConfig("state");
        if (AddressAuto) AutoAddress.Choose(this, running);
        if (Addresses.Count == 0) throw new ConfigException("--address CIDR is required (the overlay address of this node)");
        if (Mesh && PskFile.Length == 0) throw new ConfigException("--mesh needs --psk FILE: the network secret is what makes a node a member");
        if (Networks.Count == 0)
            foreach (IfAddress a in Addresses) Networks.Add(new IpPrefix(a.Address.GetAddressBytes(), a.Bits));
        if (Exit && ExitNode != null) throw new ConfigException("--exit and --exit-node exclude each other: a node offers a way out or uses one");
        if (ExitAllowLan && ExitNode == null) throw new ConfigException("--exit-allow-lan goes with --exit-node NAME");
        if (ExitFor.Count > 0 && !Exit) throw new ConfigException("--exit-for goes with --exit: it names the members this exit serves");
        // A frame is switched by its MAC address, never routed: what routes mean has no place in it.
        if (Mode != L2Mode.Tun && (Claims.Count > 0 || Exit || ExitNode != null || Filters.Count > 0))
            throw new ConfigException($"--mode {ModeName(Mode)} switches Ethernet frames: --claim, --exit, --exit-node and --filter route IP packets and go with --mode tun");
        if (Mode == L2Mode.Tun && Peers.Exists(p => p.AllowedMacs.Count > 0)) throw new ConfigException("--allow-mac goes with --mode tap or hub");
        if (Mode == L2Mode.Tun && Bridge != null) throw new ConfigException("--bridge goes with --mode tap or hub: only an Ethernet device can be a bridge port");
        if (Bridge != null && Bridge == TunName) throw new ConfigException($"--bridge {Bridge} is the TAP itself (--tun)");
        if (Claims.Count + Addresses.Count > Tune.MaxClaimsPerMember)
            throw new ConfigException($"at most {Tune.MaxClaimsPerMember - Addresses.Count} --claim prefixes (each --address is claimed too)");
        // Mesh liveness counts keepalive periods without a record, so it needs a keepalive; an explicit
        // --keepalive (even 0) is the operator's choice and is kept.
        if (Mesh && !_keepaliveGiven) PersistentKeepaliveMs = Tune.MeshKeepaliveMs;
        // Status and metrics name peers, endpoints and routes: by default only this host may read them,
        // even when --mgmt listens on a wider address.
        if (MgmtAcl.Count == 0) { MgmtAcl.Add(IpPrefix.Parse("127.0.0.0/8")); MgmtAcl.Add(IpPrefix.Parse("::1/128")); }
        if (Mtu == 0 && running != null) Mtu = running.Mtu;
        ReadOnlySpan<byte> pub = PublicKey;
        var names = new HashSet<string>();
        for (int i = 0; i < Peers.Count; i++)
        {
            PeerConfig p = Peers[i];
            // Almost always a pasted wrong key; refused here with one clear line.
            if (CryptographicOperations.FixedTimeEquals(p.PublicKey, pub)) throw new ConfigException("--peer lists this node's own public key");
            for (int j = 0; j < i; j++)
                if (p.PublicKey.EqualsCt(Peers[j].PublicKey)) throw new ConfigException($"peer {p.PublicKey.Short()} is given twice");
            if (p.Name.Length == 0) p.Name = p.PublicKey.DefaultName();
            // Names must be unique: `veil ping NAME` picks a peer by its name, and log lines name peers by it.
            if (!names.Add(p.Name)) throw new ConfigException($"peer name '{p.Name}' is given twice");
        }
        if (Peers.Count > Tune.MaxPeers) throw new ConfigException($"at most {Tune.MaxPeers} peers");
        if (Peers.FindAll(p => p.Isolated).Count > Tune.MaxMarksPerMember) throw new ConfigException($"at most {Tune.MaxMarksPerMember} peers can be isolated");
        // In a mesh the exit may be a member not met yet; without one it must be a configured peer.
        if (ExitNode != null && !Mesh && !names.Contains(ExitNode) && !Peers.Exists(p => p.PublicKey.ToBase64() == ExitNode))
            throw new ConfigException($"--exit-node '{ExitNode}' names no peer (peer names: {string.Join(", ", names)})");
        if (Mtu == 0)
        {
            // The kernel's MTU for the route to each peer (no packet is sent); 1500 where it has none.
            bool v6 = ListenAddress.AddressFamily == AddressFamily.InterNetworkV6;
            int underlay = int.MaxValue;
            foreach (PeerConfig p in Peers)
            {
                if (!p.Endpoint.IsSet) continue;
                v6 |= !p.Endpoint.IsV4;
                int m = Libc.PathMtu(p.Endpoint);
                if (m > 0) underlay = Math.Min(underlay, m);
            }
            // A frame carries its Ethernet header (and a VLAN tag) beyond the MTU of the TAP.
            Mtu = Math.Clamp(DefaultMtu(underlay == int.MaxValue ? 1500 : underlay, v6) - (Mode != L2Mode.Tun ? Ethernet.MaxHeaderLen : 0), Tune.MinMtu, Tune.MaxMtu);
        }
    }

    // A node's files sit beside its config; each network of several has its own ("state.home").
    private string BesideConfig(string file) =>
        Path.Combine(Path.GetDirectoryName(Path.GetFullPath(ConfigPath!))!, NetworkName != null ? file + "." + NetworkName : file);

    /// <summary>The restart-only keys whose values differ between two configs (empty: reloadable).</summary>
    internal List<string> RestartKeysChanged(UpConfig o)
    {
        var changed = new List<string>();
        if (KeyFile != o.KeyFile) changed.Add("key");
        if (!ListenAddress.Equals(o.ListenAddress) || ListenPort != o.ListenPort) changed.Add("listen");
        // Lists compare in order, so reordering them counts as a change; a restart is the safe answer.
        if (string.Join(",", Addresses) != string.Join(",", o.Addresses)) changed.Add("address");
        if (TunName != o.TunName) changed.Add("tun");
        if (Mtu != o.Mtu) changed.Add("mtu");
        if (ControlPath != o.ControlPath) changed.Add("control");
        if (!Equals(MgmtAddress, o.MgmtAddress) || MgmtPort != o.MgmtPort) changed.Add("mgmt");
        if (User != o.User) changed.Add("user");
        if (Cipher != o.Cipher) changed.Add("cipher");
        if (Mesh != o.Mesh) changed.Add("mesh");
        if (Name != o.Name) changed.Add("name");
        if (string.Join(",", Networks) != string.Join(",", o.Networks)) changed.Add("network");
        if (Workers != o.Workers) changed.Add("workers");
        if (RevocationsPath != o.RevocationsPath) changed.Add("revocations");
        if (StatePath != o.StatePath) changed.Add("state");
        if (BeaconStore != o.BeaconStore) changed.Add("beacon_store");
        if (BeaconLoad != o.BeaconLoad) changed.Add("beacon_load");
        if (PortMapping != o.PortMapping) changed.Add("port_mapping");
        if (FixRpFilter != o.FixRpFilter) changed.Add("fix_rp_filter");
        if (Exit != o.Exit) changed.Add("exit");
        if (Mode != o.Mode) changed.Add("mode");
        if (Bridge != o.Bridge) changed.Add("bridge");
        if (!Equals(TcpListenAddress, o.TcpListenAddress) || TcpListenPort != o.TcpListenPort) changed.Add("listen_tcp");
        return changed;
    }

    // The default leaves this much more than the overhead free: 1420 on a 1500-byte IPv4 link, as
    // WireGuard, so a network mixing both agrees on one MTU.
    private const int DefaultMtuMarginLen = Spec.PadBlockLen + 1;

    /// <summary>The default inner MTU: the underlay MTU less the record overhead and a margin.</summary>
    internal static int DefaultMtu(int underlayMtu, bool v6Underlay) =>
        underlayMtu - Record.UnderlayOverheadLen(v6Underlay) - DefaultMtuMarginLen;

    // Every file key is also a flag with '-' for '_'; "--rekey_after" is refused so each setting has one
    // spelling on the command line.
    private static readonly string[] Switches = ["--check", "--mesh", "--relay", "--no-relay", "--port-mapping", "--no-port-mapping", "--fix-rp-filter", "--exit", "--exit-allow-lan", "--isolate", "--config", "--peer", "--allow", "--allow-mac", "--peer-tcp"];

    /// <summary>Allowed prefixes that are valid but rarely meant: one given to two peers (only one
    /// of them gets the traffic) and a default route (every packet without a better route goes in).</summary>
    internal List<string> AllowedWarnings()
    {
        var w = new List<string>();
        var owner = new Dictionary<IpPrefix, string>();
        foreach (PeerConfig p in Peers)
            foreach (IpPrefix a in p.Allowed)
            {
                if (a.Bits == 0) w.Add($"peer {p.Name}: {a} sends all {(a.IsV6 ? "IPv6" : "IPv4")} traffic without a more specific route into the tunnel");
                if (owner.TryGetValue(a, out string? other)) w.Add($"{a} is allowed for both {other} and {p.Name}: only one of them gets its traffic");
                else owner[a] = p.Name;
            }
        return w;
    }

    /// <summary>Every flag `veil up` takes (for suggestions and shell completion).</summary>
    internal static List<string> Flags()
    {
        var all = new List<string>(Switches);
        foreach (string k in Keys) if (!all.Contains("--" + k.Replace('_', '-'))) all.Add("--" + k.Replace('_', '-'));
        return all;
    }

    private static ConfigException UnknownFlag(string flag) => new($"unknown flag '{flag}'{DidYouMean(flag, Flags())} (see 'veil help up')");

    /// <summary>", did you mean 'X'?" for the known word closest to a mistyped one (at most two
    /// edits, a swap of neighbours counting as one), else "".</summary>
    internal static string DidYouMean(string typed, IReadOnlyList<string> known)
    {
        string? best = null;
        int bestD = Math.Min(2, Math.Max(1, typed.Length / 3)) + 1;
        foreach (string k in known)
        {
            int d = EditDistance(typed, k);
            if (d < bestD) (best, bestD) = (k, d);
        }
        return best != null ? $", did you mean '{best}'?" : "";
    }

    // Optimal string alignment distance (Levenshtein plus adjacent transpositions).
    private static int EditDistance(string a, string b)
    {
        if (Math.Abs(a.Length - b.Length) > 2) return 3;
        var d = new int[a.Length + 1, b.Length + 1];
        for (int i = 0; i <= a.Length; i++) d[i, 0] = i;
        for (int j = 0; j <= b.Length; j++) d[0, j] = j;
        for (int i = 1; i <= a.Length; i++)
            for (int j = 1; j <= b.Length; j++)
            {
                int cost = a[i - 1] == b[j - 1] ? 0 : 1;
                d[i, j] = Math.Min(Math.Min(d[i - 1, j] + 1, d[i, j - 1] + 1), d[i - 1, j - 1] + cost);
                if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) d[i, j] = Math.Min(d[i, j], d[i - 2, j - 2] + 1);
            }
        return d[a.Length, b.Length];
    }

    private static bool IsFlag(string f) => f is "--config" or "--peer" or "--allow" or "--allow-mac" or "--peer-tcp" ||
        (f.StartsWith("--") && Array.IndexOf(Keys, f[2..].Replace('-', '_')) >= 0 && !f.Contains('_'));

    private static (IPAddress, int) ParseAddressPort(Src src, string v) =>
        Endpoint.TrySplitHostPort(v, out string host, out int port) && IPAddress.TryParse(host, out IPAddress? ip)
            ? (ip, port) : throw src.Bad(v, "must be ADDRESS:PORT (IPv6 in brackets), port 1-65535");

    private static bool ParseBool(Src src, string v) => v is "true" or "false" ? v == "true" : throw src.Bad(v, "must be true or false");

    private static int ParseInt(Src src, string v, int min, int max)
    {
        // NumberStyles.None: no sign, spaces or separators, so "-1" and " 5" get the range message; nine
        // digits cannot overflow an int.
        if (v.Length > 9 || !int.TryParse(v, System.Globalization.NumberStyles.None, null, out int n) || n < min || n > max)
            throw src.Bad(v, $"must be a whole number from {min} to {max}");
        return n;
    }

    private static IpPrefix ParsePrefix(Src src, string v) =>
        IpPrefix.TryParse(v, out IpPrefix p) ? p : throw src.Bad(v, "is not a CIDR prefix");

    // Names appear in key=value log lines, status JSON, metric labels and on the wire: this character
    // set needs no quoting or escaping in any of them.
    internal static bool IsName(string v)
    {
        if (v.Length is 0 or > 32) return false;
        foreach (char ch in v) if (!IsNameChar(ch)) return false;
        return true;
    }

    internal static bool IsNameChar(char ch) => char.IsAsciiLetterOrDigit(ch) || ch is '-' or '_' or '.';

    /// <summary>A hostname made a name: other characters become '-', cut at 32.</summary>
    internal static string MendName(string v)
    {
        var mended = new StringBuilder();
        foreach (char ch in v) mended.Append(IsNameChar(ch) ? ch : '-');
        return mended.Length > 32 ? mended.ToString(0, 32) : mended.ToString();
    }

    private static string ParseName(Src src, string v) =>
        IsName(v) ? v : throw src.Bad(v, v.Length is 0 or > 32 ? "must be 1 to 32 characters" : "may hold only letters, digits, '-', '_' and '.'");

    private static string ParseTunName(Src src, string v)
    {
        // IFNAMSIZ is 16 with the NUL; the kernel refuses a longer interface name.
        if (v.Length is 0 or > 15) throw src.Bad(v, "must be 1 to 15 characters");
        return ParseName(src, v);
    }

    internal static string ModeName(L2Mode m) => m switch { L2Mode.Tap => "tap", L2Mode.Hub => "hub", _ => "tun" };

    // A unicast MAC a peer may source: a multicast or all-zero one never is.
    private static ulong ParseMac(Src src, string v) =>
        Ethernet.TryParseMac(v, out ulong mac) && (mac >> 40 & 1) == 0 && mac != 0 ? mac : throw src.Bad(v, "is not a unicast MAC address (e.g. 02:00:00:00:00:01)");

    /// <summary>PUBKEY[@HOST:PORT] as given to --peer.</summary>
    private static PeerConfig ParsePeer(Src src, string v)
    {
        var p = new PeerConfig();
        int at = v.IndexOf('@');
        string key = at < 0 ? v : v[..at];
        if (!Key32.TryParseBase64(key, out p.PublicKey)) throw src.Bad(v, $"does not start with a base64 public key of 32 bytes");
        return at < 0 ? p : WithEndpoint(src, p, v[(at + 1)..]);
    }

    private static readonly System.Buffers.SearchValues<char> HostNameChars =
        System.Buffers.SearchValues.Create("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.");

    private static PeerConfig WithEndpoint(Src src, PeerConfig p, string ep)
    {
        if (!Endpoint.TrySplitHostPort(ep, out string host, out int port))
            throw src.Bad(ep, "must be HOST:PORT (IPv6 in brackets), port 1-65535");
        p.EndpointText = ep;
        if (IPAddress.TryParse(host, out IPAddress? ip)) { p.Endpoint = Endpoint.FromIp(ip, port); return p; }
        // 253 is the longest DNS name in text form (RFC 1035); the character check keeps a typo from
        // reaching the resolver as a query.
        if (host.Length > 253 || host.AsSpan().IndexOfAnyExcept(HostNameChars) >= 0)
            throw src.Bad(ep, "is not a valid host name");
        // A router may start before its uplink or DNS: a name that does not resolve yet is kept and
        // resolved by the daemon later (Resolver), not refused.
        ip = Resolver.TryResolve(host);
        if (ip != null) p.Endpoint = Endpoint.FromIp(ip, port);
        return p;
    }

    /// <summary>Reads a base64 32-byte key from a file that only its owner may read.</summary>
    internal static Key32 ReadKeyFile(string flag, string path)
    {
        if (!Key32.TryParseBase64(ReadSecretFile(flag, path), out Key32 key))
            throw new ConfigException($"{flag} '{path}' does not hold a base64 key of 32 bytes");
        return key;
    }

    /// <summary>The text of a file that only its owner may read.</summary>
    // The check is ssh's: any group or other bit refuses the file. Write bits count too, since whoever
    // can replace the key chooses this node's identity.
    internal static string ReadSecretFile(string flag, string path)
    {
        UnixFileMode mode;
        string text;
        if (Directory.Exists(path)) throw new ConfigException($"{flag} '{path}': a directory, not a key file");
        try
        {
            mode = File.GetUnixFileMode(path);
            text = File.ReadAllText(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException or NotSupportedException)
        {
            // Exception texts are resource keys in this trimmed build; say it in our own words.
            string why = e switch
            {
                FileNotFoundException or DirectoryNotFoundException => "no such file",
                UnauthorizedAccessException => "permission denied",
                ArgumentException or NotSupportedException => "not a valid path",
                _ => "read error",
            };
            throw new ConfigException($"{flag} '{path}': cannot read: {why}");
        }
        const UnixFileMode others = UnixFileMode.GroupRead | UnixFileMode.GroupWrite | UnixFileMode.GroupExecute |
                                    UnixFileMode.OtherRead | UnixFileMode.OtherWrite | UnixFileMode.OtherExecute;
        if ((mode & others) != 0)
            throw new ConfigException($"{flag} '{path}' is accessible by group or others (mode {Convert.ToString((int)mode, 8)}); run 'chmod 600 {path}'");
        return text;
    }
}

// ==== 5. libc interop ============================================================================
// Direct libc calls for everything the loop touches: files, ioctl, sockets, epoll, eventfd. Only
// blittable signatures (runtime marshalling is disabled); constants carry their C names. Struct
// layouts differ by architecture where the C headers say so: epoll_event is packed on x86 (12 bytes,
// data at 4) and naturally aligned elsewhere (16 bytes, data at 8); sockaddr_in/_in6 and ifreq are
// the same everywhere we run (16/28/40 bytes, ifreq.ifr_flags at 16). Errors are negative returns
// with errno read through Marshal.GetLastPInvokeError; nothing here throws.

internal static unsafe partial class Libc
{
    internal const int O_RDWR = 0x2, O_NONBLOCK = 0x800, O_CLOEXEC = 0x80000;
    internal const int AF_UNIX = 1, AF_INET = 2, AF_INET6 = 10, AF_NETLINK = 16;
    internal const int SOCK_STREAM = 1, SOCK_DGRAM = 2, SOCK_RAW = 3, SOCK_NONBLOCK = 0x800, SOCK_CLOEXEC = 0x80000;
    internal const int SOL_SOCKET = 1, SO_REUSEADDR = 2, SO_SNDBUF = 7, SO_RCVBUF = 8, SO_REUSEPORT = 15, SO_SNDBUFFORCE = 32, SO_RCVBUFFORCE = 33, SO_MARK = 36;
    internal const int IPPROTO_IPV6 = 41, IPV6_V6ONLY = 26, IPV6_HOPLIMIT = 52, IPPROTO_IP = 0, IP_TTL = 2;
    internal const int NETLINK_ROUTE = 0;
    internal const int EPOLLIN = 0x1, EPOLLOUT = 0x4, EPOLL_CTL_ADD = 1, EPOLL_CTL_DEL = 2, EPOLL_CTL_MOD = 3, EPOLL_CLOEXEC = 0x80000;
    internal const int EFD_NONBLOCK = 0x800, EFD_CLOEXEC = 0x80000;
    internal const int ESRCH = 3, EINTR = 4, EAGAIN = 11, ENOENT = 2, EEXIST = 17, EADDRINUSE = 98, EPERM = 1, EACCES = 13, EOPNOTSUPP = 95, ETIMEDOUT = 110;
    internal const int MSG_DONTWAIT = 0x40;
    internal const uint TUNSETIFF = 0x400454CA;
    internal const short IFF_TUN = 0x1, IFF_TAP = 0x2, IFF_NO_PI = 0x1000;
    internal const int IfReqLen = 40, IfNameSize = 16, IfReqFlagsOffset = 16;
    // sockaddr_un: sa_family (2) and sun_path (108).
    internal const int SockaddrIn4Len = 16, SockaddrIn6Len = 28, SockaddrUnLen = 110;

    // x86-64 packs epoll_event to keep i386's 12-byte layout (EPOLL_PACKED in linux/eventpoll.h),
    // which is i386's natural one; other architectures align the 64-bit data field.
    internal static readonly bool EpollPacked =
        RuntimeInformation.ProcessArchitecture is Architecture.X64 or Architecture.X86;
    internal static int EpollEventLen => EpollPacked ? 12 : 16;
    internal static int EpollDataOffset => EpollPacked ? 4 : 8;

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true)] internal static partial int Open(byte* path, int flags, int mode);
    [LibraryImport("libc", EntryPoint = "close")] internal static partial int Close(int fd);
    [LibraryImport("libc", EntryPoint = "read", SetLastError = true)] internal static partial nint Read(int fd, byte* buf, nuint count);
    [LibraryImport("libc", EntryPoint = "write", SetLastError = true)] internal static partial nint Write(int fd, byte* buf, nuint count);
    [LibraryImport("libc", EntryPoint = "ioctl", SetLastError = true)] internal static partial int Ioctl(int fd, nuint request, void* arg);
    [LibraryImport("libc", EntryPoint = "socket", SetLastError = true)] internal static partial int Socket(int domain, int type, int protocol);
    [LibraryImport("libc", EntryPoint = "bind", SetLastError = true)] internal static partial int Bind(int fd, byte* addr, int len);
    [LibraryImport("libc", EntryPoint = "listen", SetLastError = true)] internal static partial int Listen(int fd, int backlog);
    [LibraryImport("libc", EntryPoint = "accept4", SetLastError = true)] internal static partial int Accept4(int fd, byte* addr, int* len, int flags);
    [LibraryImport("libc", EntryPoint = "connect", SetLastError = true)] internal static partial int Connect(int fd, byte* addr, int len);
    [LibraryImport("libc", EntryPoint = "setsockopt", SetLastError = true)] internal static partial int SetSockOpt(int fd, int level, int name, void* value, int len);
    internal const int SO_ATTACH_REUSEPORT_CBPF = 51;
    [LibraryImport("libc", EntryPoint = "getsockopt", SetLastError = true)] internal static partial int GetSockOpt(int fd, int level, int name, void* value, int* len);
    [LibraryImport("libc", EntryPoint = "getsockname", SetLastError = true)] internal static partial int GetSockName(int fd, byte* addr, int* len);
    [LibraryImport("libc", EntryPoint = "sendto", SetLastError = true)] internal static partial nint SendTo(int fd, byte* buf, nuint len, int flags, byte* addr, int addrLen);
    [LibraryImport("libc", EntryPoint = "writev", SetLastError = true)] internal static partial nint Writev(int fd, IoVec* iov, int count);
    [LibraryImport("libc", EntryPoint = "posix_spawnp")] internal static partial int PosixSpawnP(int* pid, byte* file, byte* fileActions, byte* attributes, nint* argv, nint* envp);
    [LibraryImport("libc", EntryPoint = "posix_spawn_file_actions_init")] internal static partial int SpawnActionsInit(byte* actions);
    [LibraryImport("libc", EntryPoint = "posix_spawn_file_actions_destroy")] internal static partial int SpawnActionsDestroy(byte* actions);
    [LibraryImport("libc", EntryPoint = "posix_spawn_file_actions_adddup2")] internal static partial int SpawnActionsDup2(byte* actions, int fd, int newFd);
    [LibraryImport("libc", EntryPoint = "posix_spawn_file_actions_addopen")] internal static partial int SpawnActionsOpen(byte* actions, int fd, byte* path, int flags, int mode);
    [LibraryImport("libc", EntryPoint = "posix_spawnattr_init")] internal static partial int SpawnAttrInit(byte* attr);
    [LibraryImport("libc", EntryPoint = "posix_spawnattr_destroy")] internal static partial int SpawnAttrDestroy(byte* attr);
    [LibraryImport("libc", EntryPoint = "posix_spawnattr_setflags")] internal static partial int SpawnAttrSetFlags(byte* attr, short flags);
    [LibraryImport("libc", EntryPoint = "posix_spawnattr_setpgroup")] internal static partial int SpawnAttrSetPGroup(byte* attr, int pgroup);
    [LibraryImport("libc", EntryPoint = "posix_spawnattr_setsigdefault")] internal static partial int SpawnAttrSetSigDefault(byte* attr, byte* signals);
    [LibraryImport("libc", EntryPoint = "posix_spawnattr_setsigmask")] internal static partial int SpawnAttrSetSigMask(byte* attr, byte* signals);
    [LibraryImport("libc", EntryPoint = "sigemptyset")] internal static partial int SigEmptySet(byte* set);
    [LibraryImport("libc", EntryPoint = "sigaddset")] internal static partial int SigAddSet(byte* set, int signal);
    [LibraryImport("libc", EntryPoint = "pipe2", SetLastError = true)] internal static partial int Pipe2(int* fds, int flags);
    [LibraryImport("libc", EntryPoint = "poll", SetLastError = true)] internal static partial int Poll(PollFd* fds, nuint count, int timeoutMs);
    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)] internal static partial int Kill(int pid, int signal);
    [LibraryImport("libc", EntryPoint = "waitpid", SetLastError = true)] internal static partial int WaitPid(int pid, int* status, int options);
    [LibraryImport("libc", EntryPoint = "sendmmsg", SetLastError = true)] internal static partial int SendMMsg(int fd, MMsgHdr* msgs, uint count, int flags);
    [LibraryImport("libc", EntryPoint = "recvmmsg", SetLastError = true)] internal static partial int RecvMMsg(int fd, MMsgHdr* msgs, uint count, int flags, nint timeout);
    [LibraryImport("libc", EntryPoint = "recvfrom", SetLastError = true)] internal static partial nint RecvFrom(int fd, byte* buf, nuint len, int flags, byte* addr, int* addrLen);
    [LibraryImport("libc", EntryPoint = "epoll_create1", SetLastError = true)] internal static partial int EpollCreate1(int flags);
    [LibraryImport("libc", EntryPoint = "epoll_ctl", SetLastError = true)] internal static partial int EpollCtl(int epfd, int op, int fd, byte* ev);
    [LibraryImport("libc", EntryPoint = "epoll_wait", SetLastError = true)] internal static partial int EpollWait(int epfd, byte* events, int max, int timeoutMs);
    [LibraryImport("libc", EntryPoint = "eventfd", SetLastError = true)] internal static partial int EventFd(uint initval, int flags);

    internal const short POLLIN = 0x1, POLLOUT = 0x4;
    internal const int WNOHANG = 1, SIGKILL = 9, O_WRONLY = 0x1;
    internal struct PollFd { public int Fd; public short Events, REvents; }

    internal static int Errno => Marshal.GetLastPInvokeError();
    internal static string ErrorText(int errno) => Marshal.GetPInvokeErrorMessage(errno);

    /// <summary>Registers fd for EPOLLIN with the fd itself as the event data.</summary>
    internal static int EpollAdd(int epfd, int fd) => EpollSet(epfd, EPOLL_CTL_ADD, fd, EPOLLIN);
    internal static int EpollMod(int epfd, int fd, int events) => EpollSet(epfd, EPOLL_CTL_MOD, fd, events);

    private static int EpollSet(int epfd, int op, int fd, int events)
    {
        byte* ev = stackalloc byte[16];
        new Span<byte>(ev, 16).Clear();
        *(uint*)ev = (uint)events;
        *(ulong*)(ev + EpollDataOffset) = (ulong)fd;
        return EpollCtl(epfd, op, fd, ev);
    }

    internal static int EpollEventFd(byte* events, int i) => (int)*(ulong*)(events + i * EpollEventLen + EpollDataOffset);

    internal static int SetIntOpt(int fd, int level, int name, int value) => SetSockOpt(fd, level, name, &value, sizeof(int));

    /// <summary>A non-blocking TCP socket listening on address:port (0: any free one): its fd and
    /// the port it got; an IOException saying "cannot WHAT on ADDRESS:PORT: why" + hint otherwise.</summary>
    internal static (int Fd, int Port) ListenTcp(IPAddress address, int port, int backlog, string what, string hint)
    {
        bool v6 = address.AddressFamily == AddressFamily.InterNetworkV6;
        int fd = Socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        // --exit-node: accepted connections inherit the listener's mark, so replies skip the exit's table.
        if (fd >= 0 && UdpSocket.FwMark != 0) SetIntOpt(fd, SOL_SOCKET, SO_MARK, (int)UdpSocket.FwMark);
        if (fd < 0) throw new IOException($"cannot {what} on {address}:{port}: {ErrorText(Errno)}{hint}");
        // A restarted daemon can listen again while old connections sit in TIME_WAIT.
        SetIntOpt(fd, SOL_SOCKET, SO_REUSEADDR, 1);
        Span<byte> sa = stackalloc byte[SockaddrIn6Len];
        int len = WriteSockaddr(Endpoint.FromIp(address, port), v6, sa);
        fixed (byte* p = sa)
        {
            if (Bind(fd, p, len) < 0 || Listen(fd, backlog) < 0)
            {
                int e = Errno;
                Close(fd);
                throw new IOException($"cannot {what} on {address}:{port}: {ErrorText(e)}{hint}");
            }
            int alen = sa.Length;
            // Port 0 asks the kernel for a free port; getsockname says which one it gave.
            GetSockName(fd, p, &alen);
            TryReadSockaddr(sa, alen, out Endpoint bound);
            return (fd, bound.Port);
        }
    }

    /// <summary>The MTU of the route towards ep, from a connected UDP socket; 0 when there is no route.</summary>
    internal static int PathMtu(in Endpoint ep)
    {
        // connect() on UDP sends nothing: it only picks the route, whose MTU getsockopt then reports.
        const int IP_MTU = 14, IPV6_MTU = 24;
        bool v6 = !ep.IsV4;
        int fd = Socket(v6 ? AF_INET6 : AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
        if (fd < 0) return 0;
        Span<byte> sa = stackalloc byte[SockaddrIn6Len];
        int len = WriteSockaddr(ep, v6, sa);
        int mtu = 0, optLen = sizeof(int);
        fixed (byte* p = sa)
            if (Connect(fd, p, len) < 0 || GetSockOpt(fd, v6 ? IPPROTO_IPV6 : IPPROTO_IP, v6 ? IPV6_MTU : IP_MTU, &mtu, &optLen) < 0) mtu = 0;
        Close(fd);
        return mtu;
    }

    /// <summary>Writes a sockaddr_in (v4-mapped endpoints on an AF_INET socket) or sockaddr_in6.</summary>
    internal static int WriteSockaddr(in Endpoint ep, bool v6Socket, Span<byte> sa)
    {
        if (!v6Socket)
        {
            sa[..SockaddrIn4Len].Clear();
            BinaryPrimitives.WriteUInt16LittleEndian(sa, AF_INET);           // sa_family is host order
            BinaryPrimitives.WriteUInt16BigEndian(sa[2..], ep.Port);
            Span<byte> a = stackalloc byte[16];
            ep.WriteAddress16(a);
            a[12..].CopyTo(sa[4..]);
            return SockaddrIn4Len;
        }
        sa[..SockaddrIn6Len].Clear();
        BinaryPrimitives.WriteUInt16LittleEndian(sa, AF_INET6);
        BinaryPrimitives.WriteUInt16BigEndian(sa[2..], ep.Port);
        ep.WriteAddress16(sa[8..]);
        return SockaddrIn6Len;
    }

    internal static bool TryReadSockaddr(ReadOnlySpan<byte> sa, int len, out Endpoint ep)
    {
        ep = default;
        if (len < 2) return false;
        int family = BinaryPrimitives.ReadUInt16LittleEndian(sa);
        if (family == AF_INET && len >= SockaddrIn4Len)
        {
            ep = Endpoint.FromV4(BinaryPrimitives.ReadUInt32BigEndian(sa[4..]), BinaryPrimitives.ReadUInt16BigEndian(sa[2..]));
            return true;
        }
        if (family == AF_INET6 && len >= SockaddrIn6Len)
        {
            ep = new Endpoint { Address = BinaryPrimitives.ReadUInt128BigEndian(sa[8..]), Port = BinaryPrimitives.ReadUInt16BigEndian(sa[2..]) };
            return true;
        }
        return false;
    }

    internal static int WriteSockaddrUn(string path, Span<byte> sa)
    {
        sa[..SockaddrUnLen].Clear();
        BinaryPrimitives.WriteUInt16LittleEndian(sa, AF_UNIX);
        // The last byte stays 0, so sun_path is NUL-terminated even at full length; the length passed to
        // bind and connect counts that NUL.
        int n = Encoding.UTF8.GetBytes(path, sa[2..(SockaddrUnLen - 1)]);
        return 2 + n + 1;
    }
}

// ==== 6. Crypto primitives =======================================================================
// X25519 (RFC 7748) is written here because .NET has none: field elements mod p = 2^255 - 19 in ten
// limbs of alternately 26 and 25 bits, so every product is one 64-bit multiply, and a Montgomery
// ladder with masked swaps. There is no branch and no memory index that depends on a secret. Aead
// wraps ChaCha20-Poly1305 and AES-GCM (libcrypto's EVP directly, or the base library's classes)
// behind Seal/Open that never throw on a bad tag. Hkdf is RFC 5869 and the Noise two/three-output
// form over HMAC-SHA256. AdminSignature is ECDSA P-256 with SHA-256 (the base library's, over
// OpenSSL), for the revocations a network's admin signs (§15).

internal static unsafe class X25519
{
    // A field element is 10 limbs of alternately 26 and 25 bits (radix 2^25.5), so every product
    // is one 64-bit multiply on any 64-bit CPU. (Radix 2^51 needs 64x64->128 products: without
    // BMI2, which the baseline x64 NativeAOT target lacks, Math.BigMul is a call to a four-multiply
    // software routine, slower than this.) The arithmetic is written out: RyuJIT does not unroll loops.
    private const int L = 10;
    private const ulong Mask26 = (1UL << 26) - 1, Mask25 = (1UL << 25) - 1;

    /// <summary>Raw X25519 per RFC 7748 §5: clamps the scalar, ignores bit 255 of u, accepts u ≥ p.</summary>
    internal static void ScalarMult(Span<byte> shared32, ReadOnlySpan<byte> scalar32, ReadOnlySpan<byte> u32)
    {
        byte* k = stackalloc byte[32];
        ulong* w = stackalloc ulong[16 * L];           // field elements on the stack, no heap, no copies
        ulong* x1 = w, x2 = w + L, z2 = w + 2 * L, x3 = w + 3 * L, z3 = w + 4 * L, a = w + 5 * L, aa = w + 6 * L,
               b = w + 7 * L, bb = w + 8 * L, e = w + 9 * L, c = w + 10 * L, d = w + 11 * L, da = w + 12 * L,
               cb = w + 13 * L, t = w + 14 * L;
        try
        {
            scalar32[..32].CopyTo(new Span<byte>(k, 32));
            k[0] &= 248; k[31] &= 127; k[31] |= 64;
            new Span<ulong>(w, 16 * L).Clear();
            Load(x1, u32);
            x2[0] = 1;
            new Span<ulong>(x1, L).CopyTo(new Span<ulong>(x3, L));
            z3[0] = 1;
            ulong swap = 0;
            // RFC 7748 §5's ladder from bit 254 (clamping cleared 255). The swap is deferred and XORed with the
            // next bit, so every step does the same two swaps whatever the key. Add and Sub do not carry:
            // each of their results only feeds Mul, Sqr or Mul121665 (bounds at Reduce).
            for (int i = 254; i >= 0; i--)
            {
                ulong bit = (ulong)(k[i >> 3] >> (i & 7)) & 1;   // i is public; the bit is only used as a mask
                swap ^= bit;
                CSwap(x2, x3, swap); CSwap(z2, z3, swap);
                swap = bit;
                Add(a, x2, z2); Sqr(aa, a);
                Sub(b, x2, z2); Sqr(bb, b);
                Sub(e, aa, bb);
                Add(c, x3, z3); Sub(d, x3, z3);
                Mul(da, d, a); Mul(cb, c, b);
                Add(t, da, cb); Sqr(x3, t);
                Sub(t, da, cb); Sqr(t, t); Mul(z3, x1, t);
                Mul(x2, aa, bb);
                // a24 = (486662 - 2) / 4 = 121665, as RFC 7748 writes z_2 = E * (AA + a24 * E).
                Mul121665(t, e); Add(t, aa, t); Mul(z2, e, t);
            }
            CSwap(x2, x3, swap); CSwap(z2, z3, swap);
            Invert(t, z2);
            Mul(x2, x2, t);
            Store(shared32, x2);
        }
        finally
        {
            new Span<byte>(k, 32).Clear();
            new Span<ulong>(w, 16 * L).Clear();
        }
    }

    internal static void PublicKey(Span<byte> pub32, ReadOnlySpan<byte> priv32)
    {
        Span<byte> basePoint = stackalloc byte[32];
        basePoint.Clear();
        basePoint[0] = 9;
        ScalarMult(pub32, priv32, basePoint);
    }

    /// <summary>Diffie-Hellman that refuses an all-zero result (a low-order public key).</summary>
    internal static bool Dh(Span<byte> shared32, ReadOnlySpan<byte> priv32, ReadOnlySpan<byte> pub32)
    {
        ScalarMult(shared32, priv32, pub32);
        int acc = 0;
        for (int i = 0; i < 32; i++) acc |= shared32[i];
        return acc != 0;
    }

    internal static void GeneratePrivateKey(Span<byte> priv32)
    {
        RandomNumberGenerator.Fill(priv32[..32]);
        priv32[0] &= 248; priv32[31] &= 127; priv32[31] |= 64;
    }

    // Limb i starts at bit ceil(25.5 i): 0, 26, 51, 77, 102 | 128, 153, 179, 204, 230.
    private static void Load(ulong* f, ReadOnlySpan<byte> s)
    {
        ulong w0 = BinaryPrimitives.ReadUInt64LittleEndian(s), w1 = BinaryPrimitives.ReadUInt64LittleEndian(s[8..]),
              w2 = BinaryPrimitives.ReadUInt64LittleEndian(s[16..]), w3 = BinaryPrimitives.ReadUInt64LittleEndian(s[24..32]);
        f[0] = w0 & Mask26; f[1] = (w0 >> 26) & Mask25; f[2] = (w0 >> 51 | w1 << 13) & Mask26; f[3] = (w1 >> 13) & Mask25;
        f[4] = w1 >> 38; f[5] = w2 & Mask25; f[6] = (w2 >> 25) & Mask26; f[7] = (w2 >> 51 | w3 << 13) & Mask25;
        f[8] = (w3 >> 12) & Mask26; f[9] = (w3 >> 38) & Mask25;    // the mask drops bit 255
    }

    // f is a Mul output, limbs as Reduce leaves them, so f < 2^255 + 2^140 < 2p: subtract p once if
    // f >= p. q is 1 exactly when f + 19 reaches 2^255 (the chain of carries is exact).
    private static void Store(Span<byte> s, ulong* f)
    {
        ulong f0 = f[0], f1 = f[1], f2 = f[2], f3 = f[3], f4 = f[4], f5 = f[5], f6 = f[6], f7 = f[7], f8 = f[8], f9 = f[9];
        ulong q = (f0 + 19) >> 26;
        q = (f1 + q) >> 25; q = (f2 + q) >> 26; q = (f3 + q) >> 25; q = (f4 + q) >> 26;
        q = (f5 + q) >> 25; q = (f6 + q) >> 26; q = (f7 + q) >> 25; q = (f8 + q) >> 26; q = (f9 + q) >> 25;
        f0 += 19 * q;                                  // and 2^255 q is dropped from the top below
        f1 += f0 >> 26; f0 &= Mask26; f2 += f1 >> 25; f1 &= Mask25; f3 += f2 >> 26; f2 &= Mask26; f4 += f3 >> 25; f3 &= Mask25;
        f5 += f4 >> 26; f4 &= Mask26; f6 += f5 >> 25; f5 &= Mask25; f7 += f6 >> 26; f6 &= Mask26; f8 += f7 >> 25; f7 &= Mask25;
        f9 += f8 >> 26; f8 &= Mask26; f9 &= Mask25;
        BinaryPrimitives.WriteUInt64LittleEndian(s, f0 | f1 << 26 | f2 << 51);
        BinaryPrimitives.WriteUInt64LittleEndian(s[8..], f2 >> 13 | f3 << 13 | f4 << 38);
        BinaryPrimitives.WriteUInt64LittleEndian(s[16..], f5 | f6 << 25 | f7 << 51);
        BinaryPrimitives.WriteUInt64LittleEndian(s[24..32], f7 >> 13 | f8 << 12 | f9 << 38);
    }

    private static void CSwap(ulong* a, ulong* b, ulong swap)
    {
        ulong m = 0 - swap;
        for (int i = 0; i < L; i++) { ulong t = m & (a[i] ^ b[i]); a[i] ^= t; b[i] ^= t; }
    }

    private static void Add(ulong* h, ulong* f, ulong* g)
    {
        h[0] = f[0] + g[0]; h[1] = f[1] + g[1]; h[2] = f[2] + g[2]; h[3] = f[3] + g[3]; h[4] = f[4] + g[4];
        h[5] = f[5] + g[5]; h[6] = f[6] + g[6]; h[7] = f[7] + g[7]; h[8] = f[8] + g[8]; h[9] = f[9] + g[9];
    }

    // f - g computed as f + 2p - g: g is always a Reduce output (or 0, 1, or Load's u), and every such
    // limb is below 2p's (2^26 - 2 for the odd limbs, 2^27 - 2 for the even, 2^27 - 38 for limb 0).
    private const ulong P0x2 = 2 * (Mask26 - 18), P26x2 = 2 * Mask26, P25x2 = 2 * Mask25;

    private static void Sub(ulong* h, ulong* f, ulong* g)
    {
        h[0] = f[0] + P0x2 - g[0]; h[1] = f[1] + P25x2 - g[1]; h[2] = f[2] + P26x2 - g[2]; h[3] = f[3] + P25x2 - g[3];
        h[4] = f[4] + P26x2 - g[4]; h[5] = f[5] + P25x2 - g[5]; h[6] = f[6] + P26x2 - g[6]; h[7] = f[7] + P25x2 - g[7];
        h[8] = f[8] + P26x2 - g[8]; h[9] = f[9] + P25x2 - g[9];
    }

    // h = f * g. Limb i holds bits from ceil(25.5 i): a product of two odd limbs lands half a limb
    // high (factor 2), and a column past limb 9 wraps to the bottom times 19 (2^255 = 19 mod p).
    // Row by row (f_i times all of g), not column by column: RyuJIT then keeps the ten sums in
    // registers; summing a column in one expression made it spill the running sum at every term.
    private static void Mul(ulong* h, ulong* f, ulong* g)
    {
        ulong g0 = g[0], g1 = g[1], g2 = g[2], g3 = g[3], g4 = g[4], g5 = g[5], g6 = g[6], g7 = g[7], g8 = g[8], g9 = g[9];
        ulong t1 = 19 * g1, t2 = 19 * g2, t3 = 19 * g3, t4 = 19 * g4, t5 = 19 * g5, t6 = 19 * g6, t7 = 19 * g7, t8 = 19 * g8, t9 = 19 * g9;
        ulong x = f[0], y;
        ulong h0 = x * g0, h1 = x * g1, h2 = x * g2, h3 = x * g3, h4 = x * g4, h5 = x * g5, h6 = x * g6, h7 = x * g7, h8 = x * g8, h9 = x * g9;
        x = f[1]; y = 2 * x;
        h0 += y * t9; h1 += x * g0; h2 += y * g1; h3 += x * g2; h4 += y * g3; h5 += x * g4; h6 += y * g5; h7 += x * g6; h8 += y * g7; h9 += x * g8;
        x = f[2];
        h0 += x * t8; h1 += x * t9; h2 += x * g0; h3 += x * g1; h4 += x * g2; h5 += x * g3; h6 += x * g4; h7 += x * g5; h8 += x * g6; h9 += x * g7;
        x = f[3]; y = 2 * x;
        h0 += y * t7; h1 += x * t8; h2 += y * t9; h3 += x * g0; h4 += y * g1; h5 += x * g2; h6 += y * g3; h7 += x * g4; h8 += y * g5; h9 += x * g6;
        x = f[4];
        h0 += x * t6; h1 += x * t7; h2 += x * t8; h3 += x * t9; h4 += x * g0; h5 += x * g1; h6 += x * g2; h7 += x * g3; h8 += x * g4; h9 += x * g5;
        x = f[5]; y = 2 * x;
        h0 += y * t5; h1 += x * t6; h2 += y * t7; h3 += x * t8; h4 += y * t9; h5 += x * g0; h6 += y * g1; h7 += x * g2; h8 += y * g3; h9 += x * g4;
        x = f[6];
        h0 += x * t4; h1 += x * t5; h2 += x * t6; h3 += x * t7; h4 += x * t8; h5 += x * t9; h6 += x * g0; h7 += x * g1; h8 += x * g2; h9 += x * g3;
        x = f[7]; y = 2 * x;
        h0 += y * t3; h1 += x * t4; h2 += y * t5; h3 += x * t6; h4 += y * t7; h5 += x * t8; h6 += y * t9; h7 += x * g0; h8 += y * g1; h9 += x * g2;
        x = f[8];
        h0 += x * t2; h1 += x * t3; h2 += x * t4; h3 += x * t5; h4 += x * t6; h5 += x * t7; h6 += x * t8; h7 += x * t9; h8 += x * g0; h9 += x * g1;
        x = f[9]; y = 2 * x;
        h0 += y * t1; h1 += x * t2; h2 += y * t3; h3 += x * t4; h4 += y * t5; h5 += x * t6; h6 += y * t7; h7 += x * t8; h8 += y * t9; h9 += x * g0;
        Reduce(h, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9);
    }

    // h = f^2: Mul's rows with each cross product f_i f_j (i < j) taken once and doubled: d = 2 f_i,
    // q = 4 f_i where an odd limb meets an odd limb.
    private static void Sqr(ulong* h, ulong* f)
    {
        ulong f0 = f[0], f1 = f[1], f2 = f[2], f3 = f[3], f4 = f[4], f5 = f[5], f6 = f[6], f7 = f[7], f8 = f[8], f9 = f[9];
        ulong t5 = 19 * f5, t6 = 19 * f6, t7 = 19 * f7, t8 = 19 * f8, t9 = 19 * f9;
        ulong d = 2 * f0, q;
        ulong h0 = f0 * f0, h1 = d * f1, h2 = d * f2, h3 = d * f3, h4 = d * f4, h5 = d * f5, h6 = d * f6, h7 = d * f7, h8 = d * f8, h9 = d * f9;
        d = 2 * f1; q = 4 * f1;
        h2 += d * f1; h3 += d * f2; h4 += q * f3; h5 += d * f4; h6 += q * f5; h7 += d * f6; h8 += q * f7; h9 += d * f8; h0 += q * t9;
        d = 2 * f2;
        h4 += f2 * f2; h5 += d * f3; h6 += d * f4; h7 += d * f5; h8 += d * f6; h9 += d * f7; h0 += d * t8; h1 += d * t9;
        d = 2 * f3; q = 4 * f3;
        h6 += d * f3; h7 += d * f4; h8 += q * f5; h9 += d * f6; h0 += q * t7; h1 += d * t8; h2 += q * t9;
        d = 2 * f4;
        h8 += f4 * f4; h9 += d * f5; h0 += d * t6; h1 += d * t7; h2 += d * t8; h3 += d * t9;
        d = 2 * f5; q = 4 * f5;
        h0 += d * t5; h1 += d * t6; h2 += q * t7; h3 += d * t8; h4 += q * t9;
        d = 2 * f6;
        h2 += f6 * t6; h3 += d * t7; h4 += d * t8; h5 += d * t9;
        d = 2 * f7; q = 4 * f7;
        h4 += d * t7; h5 += d * t8; h6 += q * t9;
        h6 += f8 * t8; h7 += 2 * f8 * t9;
        h8 += 2 * f9 * t9;
        Reduce(h, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9);
    }

    private static void Mul121665(ulong* h, ulong* f) =>
        Reduce(h, f[0] * 121665, f[1] * 121665, f[2] * 121665, f[3] * 121665, f[4] * 121665,
               f[5] * 121665, f[6] * 121665, f[7] * 121665, f[8] * 121665, f[9] * 121665);

    // Carries the columns h0..h9 and stores them: two interleaved chains, 0->1->...->5 and
    // 4->5->...->9->0 (times 19), then 0->1 again, so each step has two independent carries.
    // Out (for the columns bounded below): limbs within their widths but h1, h5 < 2^25 + 2^11.
    // Add and Sub need no carry: on such limbs (or Load's), f + g and f + 2p - g have even limbs
    // < 3 * 2^26 and odd ones < 1.51 * 2^26. Mul's largest column, h0, is then below
    // 19 * (4 * (3 * 2^26)^2 + 10 * (1.51 * 2^26)^2) + (3 * 2^26)^2 < 2^62.2 (Sqr's columns are
    // Mul's with g = f) and Mul121665's below 2^44.5, so no column or carry target reaches 2^64.
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Reduce(ulong* h, ulong h0, ulong h1, ulong h2, ulong h3, ulong h4, ulong h5, ulong h6, ulong h7, ulong h8, ulong h9)
    {
        h1 += h0 >> 26; h0 &= Mask26; h5 += h4 >> 26; h4 &= Mask26;
        h2 += h1 >> 25; h1 &= Mask25; h6 += h5 >> 25; h5 &= Mask25;
        h3 += h2 >> 26; h2 &= Mask26; h7 += h6 >> 26; h6 &= Mask26;
        h4 += h3 >> 25; h3 &= Mask25; h8 += h7 >> 25; h7 &= Mask25;
        h5 += h4 >> 26; h4 &= Mask26; h9 += h8 >> 26; h8 &= Mask26;
        h0 += 19 * (h9 >> 25); h9 &= Mask25;
        h1 += h0 >> 26; h0 &= Mask26;
        h[0] = h0; h[1] = h1; h[2] = h2; h[3] = h3; h[4] = h4; h[5] = h5; h[6] = h6; h[7] = h7; h[8] = h8; h[9] = h9;
    }

    private static void SqrN(ulong* h, ulong* f, int n)
    {
        Sqr(h, f);
        for (int i = 1; i < n; i++) Sqr(h, h);
    }

    // h = z^(p-2) by the usual addition chain (254 squarings, 11 multiplications).
    private static void Invert(ulong* h, ulong* z)
    {
        ulong* w = stackalloc ulong[6 * L];
        ulong* z2 = w, z9 = w + L, z11 = w + 2 * L, t0 = w + 3 * L, t1 = w + 4 * L, z2_50 = w + 5 * L;
        Sqr(z2, z);                                      // 2
        SqrN(t0, z2, 2); Mul(z9, t0, z);                 // 9
        Mul(z11, z9, z2);                                // 11
        Sqr(t0, z11); Mul(t0, t0, z9);                   // 2^5 - 2^0
        SqrN(t1, t0, 5); Mul(t1, t1, t0);                // 2^10 - 2^0
        SqrN(t0, t1, 10); Mul(t0, t0, t1);               // 2^20 - 2^0
        SqrN(h, t0, 20); Mul(h, h, t0);                  // 2^40 - 2^0
        SqrN(h, h, 10); Mul(z2_50, h, t1);               // 2^50 - 2^0
        SqrN(t0, z2_50, 50); Mul(t0, t0, z2_50);         // 2^100 - 2^0
        SqrN(t1, t0, 100); Mul(t1, t1, t0);              // 2^200 - 2^0
        SqrN(t1, t1, 50); Mul(t1, t1, z2_50);            // 2^250 - 2^0
        SqrN(t1, t1, 5); Mul(h, t1, z11);                // 2^255 - 21
        new Span<ulong>(w, 6 * L).Clear();
    }
}

internal enum AeadKind : byte { ChaCha20Poly1305 = 1, Aes256Gcm = 2 }

/// <summary>Which implementation an Aead uses: the fastest this machine has (AesGcmNi for AES-256-GCM,
/// then Evp), or one named, as the self-test and the tests compare them.</summary>
internal enum AeadImpl { Fastest, Evp, BaseLibrary }

/// <summary>OpenSSL's EVP AEAD interface, called directly from the libcrypto the base library
/// already loads: one context per key and direction, kept for the key's life, so a record costs
/// four calls and a bad tag is a return value, not an exception. Unavailable (Loaded false) when
/// no libcrypto 3 or 1.1 can be opened; Aead then uses the base library.</summary>
internal static unsafe class Evp
{
    private const int EVP_CTRL_AEAD_GET_TAG = 0x10, EVP_CTRL_AEAD_SET_TAG = 0x11;
    private static readonly delegate* unmanaged<nint> CtxNew;
    private static readonly delegate* unmanaged<nint, void> CtxFree;
    private static readonly delegate* unmanaged<nint> ChaCha20Poly1305Cipher, Aes256GcmCipher, Aes128GcmCipher, Aes192GcmCipher;
    private static readonly delegate* unmanaged<nint, nint, nint, byte*, byte*, int, int> CipherInit;
    private static readonly delegate* unmanaged<nint, byte*, int*, byte*, int, int> CipherUpdate;
    private static readonly delegate* unmanaged<nint, byte*, int*, int> CipherFinal;
    private static readonly delegate* unmanaged<nint, int, int, void*, int> CtxCtrl;
    internal static readonly bool Loaded;

    static Evp()
    {
        if (Environment.GetEnvironmentVariable("VEIL_AEAD_BCL") == "1") return;    // to compare, and a way out
        nint lib = 0;
        foreach (string name in new[] { "libcrypto.so.3", "libcrypto.so.1.1" })
            if (NativeLibrary.TryLoad(name, out lib)) break;
        if (lib == 0) return;
        nint F(string n) => NativeLibrary.TryGetExport(lib, n, out nint f) ? f : 0;
        nint[] f = [F("EVP_CIPHER_CTX_new"), F("EVP_CIPHER_CTX_free"), F("EVP_chacha20_poly1305"), F("EVP_aes_256_gcm"),
                    F("EVP_CipherInit_ex"), F("EVP_CipherUpdate"), F("EVP_CipherFinal_ex"), F("EVP_CIPHER_CTX_ctrl"),
                    F("EVP_aes_128_gcm"), F("EVP_aes_192_gcm")];
        if (Array.IndexOf(f, (nint)0) >= 0) return;
        CtxNew = (delegate* unmanaged<nint>)f[0];
        CtxFree = (delegate* unmanaged<nint, void>)f[1];
        ChaCha20Poly1305Cipher = (delegate* unmanaged<nint>)f[2];
        Aes256GcmCipher = (delegate* unmanaged<nint>)f[3];
        CipherInit = (delegate* unmanaged<nint, nint, nint, byte*, byte*, int, int>)f[4];
        CipherUpdate = (delegate* unmanaged<nint, byte*, int*, byte*, int, int>)f[5];
        CipherFinal = (delegate* unmanaged<nint, byte*, int*, int>)f[6];
        CtxCtrl = (delegate* unmanaged<nint, int, int, void*, int>)f[7];
        Aes128GcmCipher = (delegate* unmanaged<nint>)f[8];
        Aes192GcmCipher = (delegate* unmanaged<nint>)f[9];
        Loaded = true;
    }

    /// <summary>A context holding the key schedule for one direction; 0 on failure.</summary>
    internal static nint NewContext(AeadKind kind, ReadOnlySpan<byte> key, bool encrypt)
    {
        nint cipher = kind == AeadKind.ChaCha20Poly1305 ? ChaCha20Poly1305Cipher()
            : key.Length switch { 16 => Aes128GcmCipher(), 24 => Aes192GcmCipher(), _ => Aes256GcmCipher() };
        nint ctx = CtxNew();
        if (ctx == 0) return 0;
        fixed (byte* k = key)
            if (CipherInit(ctx, cipher, 0, k, null, encrypt ? 1 : 0) != 1) { CtxFree(ctx); return 0; }
        return ctx;
    }

    internal static void Free(nint ctx)
    {
        if (ctx != 0) CtxFree(ctx);               // EVP_CIPHER_CTX_free cleanses the key schedule
    }

    internal static bool Seal(nint ctx, ReadOnlySpan<byte> nonce12, ReadOnlySpan<byte> plaintext, ReadOnlySpan<byte> aad, Span<byte> ctAndTag)
    {
        int outl;
        fixed (byte* n = nonce12) fixed (byte* p = plaintext) fixed (byte* a = aad) fixed (byte* c = ctAndTag)
        {
            if (CipherInit(ctx, 0, 0, null, n, 1) != 1) return false;
            if (aad.Length > 0 && CipherUpdate(ctx, null, &outl, a, aad.Length) != 1) return false;
            if (plaintext.Length > 0 && CipherUpdate(ctx, c, &outl, p, plaintext.Length) != 1) return false;
            if (CipherFinal(ctx, c + plaintext.Length, &outl) != 1) return false;
            return CtxCtrl(ctx, EVP_CTRL_AEAD_GET_TAG, Spec.TagLen, c + plaintext.Length) == 1;
        }
    }

    internal static bool Open(nint ctx, ReadOnlySpan<byte> nonce12, ReadOnlySpan<byte> ctAndTag, ReadOnlySpan<byte> aad, Span<byte> plaintext)
    {
        int n = ctAndTag.Length - Spec.TagLen, outl;
        byte* tag = stackalloc byte[Spec.TagLen];
        ctAndTag[n..].CopyTo(new Span<byte>(tag, Spec.TagLen));   // copied first: plaintext may overwrite it in place
        fixed (byte* iv = nonce12) fixed (byte* c = ctAndTag) fixed (byte* a = aad) fixed (byte* p = plaintext)
        {
            if (CipherInit(ctx, 0, 0, null, iv, 0) != 1) return false;
            if (aad.Length > 0 && CipherUpdate(ctx, null, &outl, a, aad.Length) != 1) return false;
            if (n > 0 && CipherUpdate(ctx, p, &outl, c, n) != 1) return false;
            if (CtxCtrl(ctx, EVP_CTRL_AEAD_SET_TAG, Spec.TagLen, tag) != 1) return false;
            if (CipherFinal(ctx, p + n, &outl) == 1) return true;
        }
        plaintext[..n].Clear();                    // never leave unauthenticated plaintext behind
        return false;
    }
}

/// <summary>AES-256-GCM (NIST SP 800-38D, 96-bit nonces) on the CPU's AES and carry-less multiply
/// instructions. A record is one pass: four counter blocks go through the rounds side by side,
/// and GHASH takes their ciphertext four at a time (powers H..H^4, one reduction per four). It
/// exists for the idle path: each EVP call of OpenSSL 3 looks its parameters up by name, and a
/// ping record cost about 6 us of a wake-up in EVP against well under one here; a 1,420-byte
/// record costs about what EVP's (`veil bench`). The instructions take constant time.</summary>
internal sealed class AesGcmNi : IDisposable
{
    internal static bool IsSupported => X86Aes.IsSupported && Pclmulqdq.IsSupported && Ssse3.IsSupported;
    private readonly Vector128<byte>[] _roundKeys = new Vector128<byte>[15];
    private readonly Vector128<ulong>[] _hPowers = new Vector128<ulong>[4];   // H, H^2, H^3, H^4, byte-reversed

    internal AesGcmNi(ReadOnlySpan<byte> key)
    {
        if (key.Length != 32 || !IsSupported) throw new ArgumentException("AES-256 key and AES-NI needed");
        Span<Vector128<byte>> k = _roundKeys;
        k[0] = Vector128.Create(key[..16]);
        k[1] = Vector128.Create(key[16..]);
        // FIPS 197 §5.2 for Nk = 8; the assist instruction needs its round constant as an immediate.
        k[2] = ExpandEven(k[0], X86Aes.KeygenAssist(k[1], 0x01));
        k[3] = ExpandOdd(k[1], X86Aes.KeygenAssist(k[2], 0));
        k[4] = ExpandEven(k[2], X86Aes.KeygenAssist(k[3], 0x02));
        k[5] = ExpandOdd(k[3], X86Aes.KeygenAssist(k[4], 0));
        k[6] = ExpandEven(k[4], X86Aes.KeygenAssist(k[5], 0x04));
        k[7] = ExpandOdd(k[5], X86Aes.KeygenAssist(k[6], 0));
        k[8] = ExpandEven(k[6], X86Aes.KeygenAssist(k[7], 0x08));
        k[9] = ExpandOdd(k[7], X86Aes.KeygenAssist(k[8], 0));
        k[10] = ExpandEven(k[8], X86Aes.KeygenAssist(k[9], 0x10));
        k[11] = ExpandOdd(k[9], X86Aes.KeygenAssist(k[10], 0));
        k[12] = ExpandEven(k[10], X86Aes.KeygenAssist(k[11], 0x20));
        k[13] = ExpandOdd(k[11], X86Aes.KeygenAssist(k[12], 0));
        k[14] = ExpandEven(k[12], X86Aes.KeygenAssist(k[13], 0x40));
        Vector128<ulong> h = Reverse(Encrypt(Vector128<byte>.Zero)).AsUInt64();
        _hPowers[0] = h;
        for (int i = 1; i < 4; i++) _hPowers[i] = Multiply(_hPowers[i - 1], h);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector128<byte> ExpandEven(Vector128<byte> prev, Vector128<byte> assist) =>
        Spread(prev) ^ Sse2.Shuffle(assist.AsUInt32(), 0xFF).AsByte();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector128<byte> ExpandOdd(Vector128<byte> prev, Vector128<byte> assist) =>
        Spread(prev) ^ Sse2.Shuffle(assist.AsUInt32(), 0xAA).AsByte();

    // w[i] ^= w[i-1] across the four words: each word becomes the XOR of itself and those before it.
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector128<byte> Spread(Vector128<byte> a)
    {
        a ^= Sse2.ShiftLeftLogical128BitLane(a, 4);
        a ^= Sse2.ShiftLeftLogical128BitLane(a, 4);
        return a ^ Sse2.ShiftLeftLogical128BitLane(a, 4);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private Vector128<byte> Encrypt(Vector128<byte> x)
    {
        ReadOnlySpan<Vector128<byte>> k = _roundKeys;
        x ^= k[0];
        for (int r = 1; r < 14; r++) x = X86Aes.Encrypt(x, k[r]);
        return X86Aes.EncryptLast(x, k[14]);
    }

    // GHASH works on blocks read as big-endian numbers: a byte reversal, then the bit order is the
    // reflected one the multiplication below expects (Intel's carry-less multiplication paper, §4).
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector128<byte> Reverse(Vector128<byte> x) =>
        Ssse3.Shuffle(x, Vector128.Create((byte)15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));

    // The 256-bit carry-less product a*b, added into (lo, mid, hi); Reduce turns a sum of such
    // products into one field element, so four blocks cost one reduction.
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void MultiplyAdd(Vector128<ulong> a, Vector128<ulong> b, ref Vector128<ulong> lo, ref Vector128<ulong> mid, ref Vector128<ulong> hi)
    {
        lo ^= Pclmulqdq.CarrylessMultiply(a, b, 0x00);
        hi ^= Pclmulqdq.CarrylessMultiply(a, b, 0x11);
        mid ^= Pclmulqdq.CarrylessMultiply(a, b, 0x01) ^ Pclmulqdq.CarrylessMultiply(a, b, 0x10);
    }

    // Modulo x^128 + x^7 + x^2 + x + 1 in the reflected order: shift the product left one bit,
    // then fold the low half into the high half.
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector128<ulong> Reduce(Vector128<ulong> lo, Vector128<ulong> mid, Vector128<ulong> hi)
    {
        Vector128<uint> l = (lo ^ Sse2.ShiftLeftLogical128BitLane(mid, 8)).AsUInt32();
        Vector128<uint> h = (hi ^ Sse2.ShiftRightLogical128BitLane(mid, 8)).AsUInt32();
        Vector128<uint> lc = Sse2.ShiftRightLogical(l, 31), hc = Sse2.ShiftRightLogical(h, 31);
        l = Sse2.ShiftLeftLogical(l, 1) | Sse2.ShiftLeftLogical128BitLane(lc, 4);
        h = Sse2.ShiftLeftLogical(h, 1) | Sse2.ShiftLeftLogical128BitLane(hc, 4) | Sse2.ShiftRightLogical128BitLane(lc, 12);
        Vector128<uint> a = Sse2.ShiftLeftLogical(l, 31) ^ Sse2.ShiftLeftLogical(l, 30) ^ Sse2.ShiftLeftLogical(l, 25);
        Vector128<uint> carry = Sse2.ShiftRightLogical128BitLane(a, 4);
        l ^= Sse2.ShiftLeftLogical128BitLane(a, 12);
        l ^= Sse2.ShiftRightLogical(l, 1) ^ Sse2.ShiftRightLogical(l, 2) ^ Sse2.ShiftRightLogical(l, 7) ^ carry;
        return (h ^ l).AsUInt64();
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector128<ulong> Multiply(Vector128<ulong> a, Vector128<ulong> b)
    {
        Vector128<ulong> lo = default, mid = default, hi = default;
        MultiplyAdd(a, b, ref lo, ref mid, ref hi);
        return Reduce(lo, mid, hi);
    }

    // Counter block i of the nonce: the nonce, then i as a big-endian 32-bit number.
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector128<byte> Counter(ulong nonceLo, ulong nonceHi, uint i) =>
        Vector128.Create(nonceLo, nonceHi | (ulong)BinaryPrimitives.ReverseEndianness(i) << 32).AsByte();

    private static Vector128<byte> Partial(ReadOnlySpan<byte> tail)
    {
        Span<byte> block = stackalloc byte[16];
        block.Clear();
        tail.CopyTo(block);
        return Vector128.Create((ReadOnlySpan<byte>)block);
    }

    /// <summary>Encrypts (or decrypts) input into output, which may be the same memory, and returns
    /// the tag over the aad and the ciphertext.</summary>
    private Vector128<byte> Crypt(ReadOnlySpan<byte> nonce12, ReadOnlySpan<byte> input, Span<byte> output, ReadOnlySpan<byte> aad, bool encrypt)
    {
        ReadOnlySpan<Vector128<byte>> k = _roundKeys;
        ReadOnlySpan<Vector128<ulong>> hp = _hPowers;
        ulong nLo = BinaryPrimitives.ReadUInt64LittleEndian(nonce12), nHi = BinaryPrimitives.ReadUInt32LittleEndian(nonce12[8..]);
        Vector128<ulong> y = default, h = hp[0];
        int a = 0;
        for (; a + 16 <= aad.Length; a += 16) y = Multiply(y ^ Reverse(Vector128.Create(aad.Slice(a, 16))).AsUInt64(), h);
        if (a < aad.Length) y = Multiply(y ^ Reverse(Partial(aad[a..])).AsUInt64(), h);
        int len = input.Length, off = 0;
        uint ctr = 2;                                     // block 1 encrypts the tag
        for (; off + 64 <= len; off += 64, ctr += 4)
        {
            Vector128<byte> k0 = k[0];
            Vector128<byte> c0 = Counter(nLo, nHi, ctr) ^ k0, c1 = Counter(nLo, nHi, ctr + 1) ^ k0;
            Vector128<byte> c2 = Counter(nLo, nHi, ctr + 2) ^ k0, c3 = Counter(nLo, nHi, ctr + 3) ^ k0;
            for (int r = 1; r < 14; r++)
            {
                Vector128<byte> kr = k[r];
                c0 = X86Aes.Encrypt(c0, kr);
                c1 = X86Aes.Encrypt(c1, kr);
                c2 = X86Aes.Encrypt(c2, kr);
                c3 = X86Aes.Encrypt(c3, kr);
            }
            Vector128<byte> kl = k[14];
            Vector128<byte> d0 = Vector128.Create(input.Slice(off, 16)), d1 = Vector128.Create(input.Slice(off + 16, 16));
            Vector128<byte> d2 = Vector128.Create(input.Slice(off + 32, 16)), d3 = Vector128.Create(input.Slice(off + 48, 16));
            Vector128<byte> o0 = X86Aes.EncryptLast(c0, kl) ^ d0, o1 = X86Aes.EncryptLast(c1, kl) ^ d1;
            Vector128<byte> o2 = X86Aes.EncryptLast(c2, kl) ^ d2, o3 = X86Aes.EncryptLast(c3, kl) ^ d3;
            o0.CopyTo(output.Slice(off, 16));
            o1.CopyTo(output.Slice(off + 16, 16));
            o2.CopyTo(output.Slice(off + 32, 16));
            o3.CopyTo(output.Slice(off + 48, 16));
            if (encrypt) (d0, d1, d2, d3) = (o0, o1, o2, o3);
            Vector128<ulong> lo = default, mid = default, hi = default;
            MultiplyAdd(y ^ Reverse(d0).AsUInt64(), hp[3], ref lo, ref mid, ref hi);
            MultiplyAdd(Reverse(d1).AsUInt64(), hp[2], ref lo, ref mid, ref hi);
            MultiplyAdd(Reverse(d2).AsUInt64(), hp[1], ref lo, ref mid, ref hi);
            MultiplyAdd(Reverse(d3).AsUInt64(), h, ref lo, ref mid, ref hi);
            y = Reduce(lo, mid, hi);
        }
        Span<byte> block = stackalloc byte[16];
        for (; off < len; off += 16, ctr++)
        {
            int n = Math.Min(16, len - off);
            Vector128<byte> d = n == 16 ? Vector128.Create(input.Slice(off, 16)) : Partial(input[off..]);
            Vector128<byte> o = Encrypt(Counter(nLo, nHi, ctr)) ^ d;
            if (n == 16) o.CopyTo(output.Slice(off, 16));
            else
            {
                o.CopyTo(block);
                block[..n].CopyTo(output[off..]);
                block[n..].Clear();                       // the keystream past the end is not ciphertext
                o = Vector128.Create((ReadOnlySpan<byte>)block);
            }
            y = Multiply(y ^ Reverse(encrypt ? o : d).AsUInt64(), h);
        }
        y = Multiply(y ^ Vector128.Create((ulong)len * 8, (ulong)aad.Length * 8), h);   // the lengths block, reversed
        return Reverse(y.AsByte()) ^ Encrypt(Counter(nLo, nHi, 1));
    }

    internal void Seal(ReadOnlySpan<byte> nonce12, ReadOnlySpan<byte> plaintext, ReadOnlySpan<byte> aad, Span<byte> ctAndTag) =>
        Crypt(nonce12, plaintext, ctAndTag[..plaintext.Length], aad, encrypt: true).CopyTo(ctAndTag.Slice(plaintext.Length, Spec.TagLen));

    /// <summary>Decrypts ctAndTag (tag last) into plaintext when the tag verifies; otherwise false,
    /// and plaintext is zero.</summary>
    internal bool Open(ReadOnlySpan<byte> nonce12, ReadOnlySpan<byte> ctAndTag, ReadOnlySpan<byte> aad, Span<byte> plaintext)
    {
        int n = ctAndTag.Length - Spec.TagLen;
        Vector128<byte> given = Vector128.Create(ctAndTag.Slice(n, Spec.TagLen));   // read first: plaintext may overwrite it
        Vector128<byte> diff = Crypt(nonce12, ctAndTag[..n], plaintext[..n], aad, encrypt: false) ^ given;
        if (diff == Vector128<byte>.Zero) return true;    // one comparison of the whole difference: no early exit per byte
        plaintext[..n].Clear();
        return false;
    }

    public void Dispose()
    {
        Array.Clear(_roundKeys);
        Array.Clear(_hPowers);
    }
}

/// <summary>One AEAD key. Seal/Open take a 12-byte nonce; ciphertext is followed by a 16-byte tag.
/// AES-256-GCM records up to NiMaxLen go through AesGcmNi where the CPU has it; the rest through
/// Evp where it loaded (no exception on a bad tag), else the base library.</summary>
internal sealed class Aead : IDisposable
{
    internal const int TagLen = Spec.TagLen;
    private readonly ChaCha20Poly1305? _chacha;
    private readonly AesGcm? _gcm;
    private readonly AesGcmNi? _ni;
    private nint _sealCtx, _openCtx;
    internal AeadKind Kind { get; }

    internal Aead(AeadKind kind, ReadOnlySpan<byte> key, AeadImpl impl = AeadImpl.Fastest)
    {
        Kind = kind;
        if (impl == AeadImpl.Fastest && kind == AeadKind.Aes256Gcm && key.Length == 32 && NiWanted) _ni = new AesGcmNi(key);
        if (Evp.Loaded && impl != AeadImpl.BaseLibrary && (kind == AeadKind.ChaCha20Poly1305 ? key.Length == 32 : key.Length is 16 or 24 or 32))
        {
            // Two contexts, one per direction: EVP fixes the direction when the key is set, so the key schedule
            // is computed once here and each record only sets its nonce.
            _sealCtx = Evp.NewContext(kind, key, encrypt: true);
            _openCtx = Evp.NewContext(kind, key, encrypt: false);
            if (_sealCtx != 0 && _openCtx != 0) return;
            Evp.Free(_sealCtx);
            Evp.Free(_openCtx);
            _sealCtx = _openCtx = 0;
        }
        if (_ni != null) return;                   // it takes every length when EVP is unavailable
        // (the base library's objects below are the fallback when EVP is unavailable)
        if (kind == AeadKind.ChaCha20Poly1305) _chacha = new ChaCha20Poly1305(key);
        else _gcm = new AesGcm(key, TagLen);
    }

    // AES-GCM on AES-NI unless the CPU lacks it or VEIL_AEAD_NI=off / VEIL_AEAD_BCL=1 asks otherwise;
    // records longer than NiMaxLen go to EVP, whose stitched assembly is faster per byte (about twice
    // at 9,000 bytes; even at 1,420).
    private const int NiMaxLen = 2048;
    private static readonly bool NiWanted = AesGcmNi.IsSupported && Environment.GetEnvironmentVariable("VEIL_AEAD_NI") != "off"
        && Environment.GetEnvironmentVariable("VEIL_AEAD_BCL") != "1";

    internal static bool IsSupported(AeadKind kind) =>
        kind == AeadKind.ChaCha20Poly1305 ? ChaCha20Poly1305.IsSupported : AesGcm.IsSupported;

    /// <summary>What seals records: AES-GCM's and ChaCha20-Poly1305's implementations when they differ.</summary>
    internal static string Backend => (NiWanted ? "aes-ni," : "") + (Evp.Loaded ? "openssl-evp" : "bcl");

    internal void Seal(ReadOnlySpan<byte> nonce12, ReadOnlySpan<byte> plaintext, ReadOnlySpan<byte> aad, Span<byte> ciphertextAndTag)
    {
        if (_ni != null && (plaintext.Length <= NiMaxLen || _sealCtx == 0))
        {
            _ni.Seal(nonce12, plaintext, aad, ciphertextAndTag);
            return;
        }
        if (_sealCtx != 0)
        {
            if (!Evp.Seal(_sealCtx, nonce12, plaintext, aad, ciphertextAndTag[..(plaintext.Length + TagLen)]))
                throw new CryptographicException("EVP seal failed");    // cannot happen with valid sizes; never silently send garbage
            return;
        }
        Span<byte> ct = ciphertextAndTag[..plaintext.Length];
        Span<byte> tag = ciphertextAndTag.Slice(plaintext.Length, TagLen);
        if (_chacha != null) _chacha.Encrypt(nonce12, plaintext, ct, tag, aad);
        else _gcm!.Encrypt(nonce12, plaintext, ct, tag, aad);
    }

    /// <summary>Returns false (and writes nothing usable) when the input is short or the tag does not verify.</summary>
    internal bool Open(ReadOnlySpan<byte> nonce12, ReadOnlySpan<byte> ciphertextAndTag, ReadOnlySpan<byte> aad, Span<byte> plaintext)
    {
        int n = ciphertextAndTag.Length - TagLen;
        if (n < 0 || plaintext.Length < n || nonce12.Length != 12) return false;
        if (_ni != null && (n <= NiMaxLen || _openCtx == 0)) return _ni.Open(nonce12, ciphertextAndTag, aad, plaintext[..n]);
        if (_openCtx != 0) return Evp.Open(_openCtx, nonce12, ciphertextAndTag, aad, plaintext[..n]);
        try
        {
            if (_chacha != null) _chacha.Decrypt(nonce12, ciphertextAndTag[..n], ciphertextAndTag[n..], plaintext[..n], aad);
            else _gcm!.Decrypt(nonce12, ciphertextAndTag[..n], ciphertextAndTag[n..], plaintext[..n], aad);
            return true;
        }
        catch (CryptographicException)
        {
            return false;   // the base library reports a bad tag only this way
        }
    }

    public void Dispose()
    {
        Evp.Free(_sealCtx);
        Evp.Free(_openCtx);
        _sealCtx = _openCtx = 0;
        _chacha?.Dispose();
        _gcm?.Dispose();
        _ni?.Dispose();
    }
}

internal static class Hkdf
{
    /// <summary>RFC 5869 HKDF-SHA256; false for an output length of 0 or over 255 × 32.</summary>
    internal static bool Derive(Span<byte> output, ReadOnlySpan<byte> ikm, ReadOnlySpan<byte> salt, ReadOnlySpan<byte> info)
    {
        // RFC 5869 §2.3 allows at most 255 blocks of the hash; HKDF.DeriveKey would throw past that.
        if (output.Length == 0 || output.Length > 255 * 32) return false;
        HKDF.DeriveKey(HashAlgorithmName.SHA256, ikm, output, salt, info);
        return true;
    }

    /// <summary>Noise HKDF(ck, ikm) with two outputs, or three when out3 is not empty.</summary>
    internal static void Noise(ReadOnlySpan<byte> chainingKey, ReadOnlySpan<byte> ikm, Span<byte> out1, Span<byte> out2, Span<byte> out3)
    {
        Span<byte> temp = stackalloc byte[32];
        Span<byte> buf = stackalloc byte[33];
        // Noise §4.3: temp = HMAC(ck, ikm); out1 = HMAC(temp, 0x01); out2 = HMAC(temp, out1 ‖ 0x02);
        // out3 = HMAC(temp, out2 ‖ 0x03).
        HMACSHA256.HashData(chainingKey, ikm, temp);
        buf[0] = 1;
        HMACSHA256.HashData(temp, buf[..1], out1);
        out1[..32].CopyTo(buf);
        buf[32] = 2;
        HMACSHA256.HashData(temp, buf, out2);
        if (out3.Length > 0)
        {
            out2[..32].CopyTo(buf);
            buf[32] = 3;
            HMACSHA256.HashData(temp, buf, out3);
        }
        CryptographicOperations.ZeroMemory(temp);
        CryptographicOperations.ZeroMemory(buf);
    }
}

/// <summary>ECDSA P-256 / SHA-256 with fixed-size signatures (r ‖ s, 64 bytes). A public key is the
/// point's x ‖ y (64 bytes); a private key is d ‖ x ‖ y (96 bytes), kept base64 in a 0600 file. Raw
/// keys rather than PKCS#8: its parser would add half a megabyte to the binary.</summary>
internal static class AdminSignature
{
    internal const int PublicKeyLen = 64, PrivateKeyLen = 96, SignatureLen = 64;

    private static ECParameters Parameters(ReadOnlySpan<byte> pub, ReadOnlySpan<byte> d) => new()
    {
        Curve = ECCurve.NamedCurves.nistP256,
        Q = new ECPoint { X = pub[..32].ToArray(), Y = pub[32..PublicKeyLen].ToArray() },
        D = d.IsEmpty ? null : d.ToArray(),
    };

    /// <summary>True when pub is a point on the curve (ImportParameters checks it).</summary>
    internal static bool IsPublicKey(ReadOnlySpan<byte> pub)
    {
        if (pub.Length != PublicKeyLen) return false;
        try { using ECDsa k = ECDsa.Create(Parameters(pub, default)); return true; }
        catch (CryptographicException) { return false; }
    }

    internal static byte[] NewPrivateKey()
    {
        using ECDsa k = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        ECParameters p = k.ExportParameters(true);
        byte[] key = [.. p.D!, .. p.Q.X!, .. p.Q.Y!];
        CryptographicOperations.ZeroMemory(p.D);
        return key;
    }

    /// <summary>The public half of a private key; null if it is not a P-256 key pair.</summary>
    internal static byte[]? PublicKeyOf(byte[] priv)
    {
        if (priv.Length != PrivateKeyLen) return null;
        try { using ECDsa k = ECDsa.Create(Parameters(priv.AsSpan(32), priv.AsSpan(0, 32))); }
        catch (CryptographicException) { return null; }
        return priv[32..];
    }

    internal static byte[] Sign(byte[] priv, ReadOnlySpan<byte> message)
    {
        ECParameters p = Parameters(priv.AsSpan(32), priv.AsSpan(0, 32));
        using ECDsa k = ECDsa.Create(p);
        CryptographicOperations.ZeroMemory(p.D);
        // r ‖ s at fixed width (IEEE P1363), not DER: a revocation's signature has one length on the wire.
        return k.SignData(message.ToArray(), HashAlgorithmName.SHA256, DSASignatureFormat.IeeeP1363FixedFieldConcatenation);
    }

    internal static bool Verify(ReadOnlySpan<byte> pub, ReadOnlySpan<byte> message, ReadOnlySpan<byte> signature)
    {
        // The point is checked first because ECDsa.Create throws on one off the curve: Verify never throws
        // on what a member sends.
        if (signature.Length != SignatureLen || !IsPublicKey(pub)) return false;
        using ECDsa k = ECDsa.Create(Parameters(pub, default));
        return k.VerifyData(message, signature, HashAlgorithmName.SHA256, DSASignatureFormat.IeeeP1363FixedFieldConcatenation);
    }
}

// ==== 7. Dataplane: TUN & netlink ================================================================
// IDataplane is where IP packets enter and leave the node: TunDevice (/dev/net/tun, IFF_TUN |
// IFF_NO_PI, non-blocking; closing the fd removes the interface) or LoopbackDataplane (in memory, for
// tests that run several nodes in one process). Netlink configures the interface the way `ip` would,
// but directly over rtnetlink: link up and MTU, addresses (IPv6 without DAD so the first packet
// flows), and routes for allowed prefixes, tagged with our own route protocol number so they can be
// told apart from routes Veil did not create.
// Offloads (PERF's largest win): TunDevice opens the TUN with IFF_VNET_HDR and asks TUNSETOFFLOAD for
// TSO and USO, so a read may be a super-packet of up to 64 KiB behind a virtio_net_hdr; Segmenter cuts
// it into MTU packets (and finishes partial checksums), and Coalescer merges what we write back into
// super-packets (GRO in reverse). A TUN queue per worker with IFF_MULTI_QUEUE. VEIL_OFFLOADS=off or
// a kernel that refuses them gives a plain TUN, one packet per read.

internal interface IDataplane : IDisposable
{
    int Fd { get; }                                  // -1 when not pollable
    /// <summary>Reads one packet; 0 when none is waiting, negative errno on failure.</summary>
    int Read(Span<byte> buffer);
    bool Write(ReadOnlySpan<byte> packet);

    /// <summary>Writes every slot of b with a length; returns how many were refused. One write per
    /// packet unless the device does better.</summary>
    int WriteBatch(PacketBatch b)
    {
        int refused = 0;
        for (int i = 0; i < b.Count; i++)
            if (b.Length[i] > 0 && !Write(b.Packet(i))) refused++;
        return refused;
    }
}

internal sealed unsafe class TunDevice : IDataplane
{
    private const uint TUNSETOFFLOAD = 0x400454D0;
    private const short IFF_VNET_HDR = 0x4000, IFF_MULTI_QUEUE = 0x100;
    private const int TUN_F_CSUM = 0x1, TUN_F_TSO4 = 0x2, TUN_F_TSO6 = 0x4, TUN_F_USO4 = 0x20, TUN_F_USO6 = 0x40;
    private int _fd;
    internal string Name { get; }
    internal int IfIndex { get; }
    internal bool Offload { get; }                  // virtio header framing: reads may be TSO super-packets
    public int Fd => _fd;
    // A super-packet read from the kernel, handed out one segment per Read.
    private readonly byte[] _super = GC.AllocateUninitializedArray<byte>(Segmenter.VirtioHdrLen + 65535, pinned: true);
    private readonly Segmenter _segmenter = new();
    private readonly byte[] _zeroHdr = GC.AllocateArray<byte>(Segmenter.VirtioHdrLen, pinned: true);
    // Counted on the I/O side, outside the node's lock; Worker.Settle moves them into Counters.
    internal long SuperPackets, Coalesced, Malformed;

    private readonly bool _tap;                     // frames: the IP packet starts behind an Ethernet header

    private TunDevice(int fd, string name, int ifIndex, bool offload, bool tap)
    {
        _fd = fd; Name = name; IfIndex = ifIndex; Offload = offload; _tap = tap;
        _segmenter.Tap = tap;
    }

    /// <summary>Creates the interface or throws with one line saying why. With offload, the kernel
    /// may hand us TCP and UDP super-packets of up to 64 KiB (TSO, USO) with checksums left to us;
    /// Read splits them. multiQueue: one queue of a multi-queue interface (the first call creates
    /// it, each further call with the same name adds a queue; the kernel spreads flows over them).</summary>
    internal static TunDevice Create(string name, bool offload = true, bool multiQueue = false, ulong tapMac = 0)
    {
        byte* path = stackalloc byte[16];
        Encoding.ASCII.GetBytes("/dev/net/tun\0", new Span<byte>(path, 16));
        int fd = Libc.Open(path, Libc.O_RDWR | Libc.O_NONBLOCK | Libc.O_CLOEXEC, 0);
        if (fd < 0) throw new IOException($"cannot open /dev/net/tun: {Libc.ErrorText(Libc.Errno)} (is the tun module loaded, and are we root or CAP_NET_ADMIN?)");
        byte* ifr = stackalloc byte[Libc.IfReqLen];
        var req = new Span<byte>(ifr, Libc.IfReqLen);
        req.Clear();
        Encoding.ASCII.GetBytes(name, req[..(Libc.IfNameSize - 1)]);
        *(short*)(ifr + Libc.IfReqFlagsOffset) = (short)((tapMac != 0 ? Libc.IFF_TAP : Libc.IFF_TUN) | Libc.IFF_NO_PI | (offload ? IFF_VNET_HDR : 0) | (multiQueue ? IFF_MULTI_QUEUE : 0));
        if (Libc.Ioctl(fd, Libc.TUNSETIFF, ifr) < 0)
        {
            int e = Libc.Errno;
            Libc.Close(fd);
            throw new IOException($"cannot create {(tapMac != 0 ? "TAP" : "TUN")} '{name}': {Libc.ErrorText(e)}" + (e == 16 ? " (the name is in use, or is a device of the other kind)" : ""));
        }
        // A TAP's MAC follows from the node's key, so neighbours' ARP caches survive a restart.
        // (The sockaddr after the name: family ARPHRD_ETHER, then the address.)
        if (tapMac != 0)
        {
            *(ushort*)(ifr + Libc.IfNameSize) = 1;
            for (int i = 0; i < 6; i++) ifr[Libc.IfNameSize + 2 + i] = (byte)(tapMac >> (40 - 8 * i));
            if (Libc.Ioctl(fd, SIOCSIFHWADDR, ifr) < 0)
            {
                int e = Libc.Errno;
                Libc.Close(fd);
                throw new IOException($"cannot set the MAC address of TAP '{name}': {Libc.ErrorText(e)}");
            }
        }
        // Should TUNSETOFFLOAD fail, the kernel sends whole packets; the virtio header stays (all zero).
        // Kernels before 6.2 refuse the USO bits as a whole: then TCP offloads alone.
        const int tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        bool uso = offload && Libc.Ioctl(fd, TUNSETOFFLOAD, (void*)(nuint)(tso | TUN_F_USO4 | TUN_F_USO6)) >= 0;
        bool accepted = uso || offload && Libc.Ioctl(fd, TUNSETOFFLOAD, (void*)(nuint)tso) >= 0;
        int index = Netlink.IfIndex(name);
        if (index <= 0)
        {
            Libc.Close(fd);
            throw new IOException($"TUN '{name}' was created but has no interface index");
        }
        return new TunDevice(fd, name, index, offload, tapMac != 0) { OffloadsAccepted = accepted, UdpOffloadAccepted = uso, Mac = tapMac };
    }

    private const uint SIOCSIFHWADDR = 0x8924;

    /// <summary>A locally administered unicast MAC from the node's public key (--mode tap|hub).</summary>
    internal static ulong MacFor(ReadOnlySpan<byte> publicKey) => Ethernet.Mac(publicKey) & ~(3UL << 40) | 2UL << 40;

    internal ulong Mac { get; private init; }            // a TAP's own address; 0 for a TUN

    internal bool OffloadsAccepted { get; private init; }
    internal bool UdpOffloadAccepted { get; private init; }

    public int Read(Span<byte> buffer)
    {
        if (!Offload)
            fixed (byte* p = buffer) return Done(Libc.Read(_fd, p, (nuint)buffer.Length));
        while (true)
        {
            int n = _segmenter.Next(buffer);
            if (n > 0) return n;
            nint got;
            fixed (byte* p = _super) got = Libc.Read(_fd, p, (nuint)_super.Length);
            int r = Done(got);
            if (r <= 0) return r;
            if (!_segmenter.Start(_super.AsSpan(0, r))) { Interlocked.Increment(ref Malformed); continue; }
            if (!_segmenter.Whole) Interlocked.Increment(ref SuperPackets);
        }
    }

    private static int Done(nint n)
    {
        if (n >= 0) return (int)n;
        int e = Libc.Errno;
        return e == Libc.EAGAIN || e == Libc.EINTR ? 0 : -e;
    }

    public bool Write(ReadOnlySpan<byte> packet)
    {
        if (!Offload)
            fixed (byte* p = packet) return Libc.Write(_fd, p, (nuint)packet.Length) == packet.Length;
        // Each write starts with a virtio header; all zero says "a whole packet, checksums done".
        IoVec* iov = stackalloc IoVec[2];
        fixed (byte* h = _zeroHdr) fixed (byte* p = packet)
        {
            iov[0] = new IoVec { Base = (nint)h, Len = (nuint)Segmenter.VirtioHdrLen };
            iov[1] = new IoVec { Base = (nint)p, Len = (nuint)packet.Length };
            return Libc.Writev(_fd, iov, 2) == Segmenter.VirtioHdrLen + packet.Length;
        }
    }

    /// <summary>Writes the batch; consecutive segments of one TCP flow (with USO also datagrams of one
    /// UDP flow) go down as one super-packet (GRO in reverse of Segmenter): one writev with a virtio
    /// header, the first packet whole (its lengths and the L4 checksum seed rewritten) and only the
    /// payload of the others.</summary>
    public int WriteBatch(PacketBatch b)
    {
        int refused = 0;
        for (int i = 0; i < b.Count;)
        {
            if (b.Length[i] == 0) { i++; continue; }
            int link = _tap ? Ethernet.IpOffset(b.Packet(i)) : 0;
            int end = Offload && link >= 0 ? Coalescer.RunEnd(b, i, UdpOffloadAccepted, link) : i + 1;
            if (end - i == 1 ? !Write(b.Packet(i)) : !WriteCoalesced(b, i, end, link)) refused += end - i;
            i = end;
        }
        return refused;
    }

    // link: the Ethernet header's length on a TAP (the run's frames share it), 0 on a TUN; the
    // virtio header's offsets count from the start of the frame.
    private bool WriteCoalesced(PacketBatch b, int from, int to, int link)
    {
        Span<byte> head = b.Packet(from)[link..];
        int hdrLen = Coalescer.HeaderLen(head), ipLen = Coalescer.IpHeaderLen(head);
        int payload = 0, count = 0;
        for (int k = from; k < to; k++) if (b.Length[k] > 0) { payload += b.Length[k] - link - hdrLen; count++; }
        int gsoSize = head.Length - hdrLen;
        Coalescer.RewriteHead(head, hdrLen, ipLen, payload, b.Packet(to - 1)[link..]);
        byte* vh = stackalloc byte[Segmenter.VirtioHdrLen];
        bool udp = Coalescer.IsUdp(head);
        vh[0] = Segmenter.NeedsCsum;                            // the kernel finishes the L4 checksums
        vh[1] = udp ? Segmenter.GsoUdpL4 : Ip.Version(head) == 6 ? Segmenter.GsoTcpV6 : Segmenter.GsoTcpV4;
        *(ushort*)(vh + 2) = (ushort)(link + hdrLen);
        *(ushort*)(vh + 4) = (ushort)gsoSize;
        *(ushort*)(vh + 6) = (ushort)(link + ipLen);
        *(ushort*)(vh + 8) = (ushort)(udp ? 6 : 16);
        IoVec* iov = stackalloc IoVec[Tune.BatchSize + 2];
        int n = 0;
        iov[n++] = new IoVec { Base = (nint)vh, Len = (nuint)Segmenter.VirtioHdrLen };
        for (int k = from; k < to; k++)
        {
            if (b.Length[k] == 0) continue;
            int skip = k == from ? 0 : link + hdrLen;
            fixed (byte* p = b.Packet(k)) iov[n++] = new IoVec { Base = (nint)(p + skip), Len = (nuint)(b.Length[k] - skip) };   // slots are pinned
        }
        Interlocked.Add(ref Coalesced, count);
        return Libc.Writev(_fd, iov, n) == Segmenter.VirtioHdrLen + link + hdrLen + payload;
    }

    public void Dispose()
    {
        if (_fd >= 0) Libc.Close(_fd);
        _fd = -1;
    }
}

/// <summary>The kernel settings Veil changes while it runs (sysctl files): --fix-rp-filter's
/// rp_filter, an exit node's forwarding. Each change is logged; at exit each is put back unless
/// someone changed it meanwhile, or its file went (an interface's, with the interface).</summary>
internal sealed class Sysctls(Log log, string? journalPath = null)
{
    private readonly List<(string Path, string Was, string Set)> _changed = new();

    // What we changed is also written to a journal beside the control socket, so the start after a
    // crash (kill -9, power loss) puts back what the crashed run set (Recover); a clean exit deletes it.
    internal static string JournalPath(string controlPath) => controlPath + ".sysctl";

    /// <summary>At start: what a run that did not end cleanly changed goes back, where it still holds
    /// the value that run set. Only /proc/sys/net files and numbers are taken from the journal.</summary>
    internal static void Recover(string journalPath, Log log)
    {
        if (!File.Exists(journalPath)) return;
        try
        {
            foreach (string line in File.ReadAllLines(journalPath))
            {
                if (line.StartsWith("boot ", StringComparison.Ordinal)) { if (line[5..] != BootId()) break; continue; }
                string[] f = line.Split(' ');
                if (f.Length != 3 || !f[0].StartsWith("/proc/sys/net/", StringComparison.Ordinal) || f[0].Contains("..") ||
                    !IsNumber(f[1]) || !IsNumber(f[2]) || !File.Exists(f[0]) || File.ReadAllText(f[0]).Trim() != f[2]) continue;
                File.WriteAllText(f[0], f[1] + "\n");
                log.Info("sysctl_restored", $"file={f[0]} to={f[1]} reason=previous_run_did_not_exit_cleanly");
            }
            File.Delete(journalPath);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            log.Warn("sysctl_not_restored", $"file={journalPath} error=\"{e.Message}\"");
        }
    }

    // After a reboot the sysctls are the boot's own, whatever a journal from before says.
    private static string BootId() => Read("/proc/sys/kernel/random/boot_id");

    private static bool IsNumber(string s) => s.Length is > 0 and < 12 && s.AsSpan().IndexOfAnyExceptInRange('0', '9') < 0;

    private void WriteJournal()
    {
        if (journalPath == null) return;
        try
        {
            if (_changed.Count == 0) File.Delete(journalPath);
            else Onboarding.WriteAtomic(journalPath, $"boot {BootId()}\n" + string.Concat(_changed.ConvertAll(c => $"{c.Path} {c.Was} {c.Set}\n")), UnixFileMode.UserRead | UnixFileMode.UserWrite);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ConfigException)
        {
            log.Warn("sysctl_journal_not_written", $"file={journalPath} error=\"{e.Message}\" hint=\"after a crash, put the sysctls back by hand\"");
        }
    }

    internal static string ConfPath(string family, string conf, string key) => $"/proc/sys/net/{family}/conf/{conf}/{key}";

    /// <summary>A /proc or /sys file's value, trimmed; "" when it cannot be read.</summary>
    internal static string Read(string path)
    {
        try { return File.ReadAllText(path).Trim(); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return ""; }
    }

    /// <summary>Writes value into path when its current value passes when; false if it did not.</summary>
    internal bool Set(string path, string value, Func<string, bool> when, string reason)
    {
        try
        {
            string was = File.ReadAllText(path).Trim();
            if (was == value || !when(was)) return false;
            File.WriteAllText(path, value + "\n");
            _changed.Add((path, was, value));
            WriteJournal();
            log.Info("sysctl_set", $"file={path} from={was} to={value} reason={reason}");
            return true;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            log.Warn("sysctl_not_set", $"file={path} to={value} reason={reason} error=\"{e.Message}\"");
            return false;
        }
    }

    /// <summary>Puts back what Set changed (only: that one file), newest first.</summary>
    internal void Restore(string? only = null)
    {
        for (int i = _changed.Count - 1; i >= 0; i--)
        {
            var (path, was, set) = _changed[i];
            if (only != null && path != only) continue;
            _changed.RemoveAt(i);
            try
            {
                if (!File.Exists(path) || File.ReadAllText(path).Trim() != set) continue;
                File.WriteAllText(path, was + "\n");
                log.Info("sysctl_restored", $"file={path} to={was}");
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                log.Warn("sysctl_not_restored", $"file={path} error=\"{e.Message}\" hint=\"it stays {set}; write {was} to go back\"");
            }
        }
        WriteJournal();
    }
}

/// <summary>The TUN's kernel routes, made to follow the node's route table: Sync adds the prefixes
/// it gained and removes those it lost. Removal names our route protocol, so a route Veil did not add
/// is never touched. Called from one thread at a time (the daemon's chores). A prefix the kernel
/// will not route to us is a conflict, never silent: logged (route_conflict) and kept in Conflicts
/// for status and doctor until it goes away.</summary>
internal sealed class KernelRoutes(int ifIndex, Log log)
{
    private readonly Dictionary<IpPrefix, int> _installed = new();   // each installed prefix, and the table it went to
    // --exit-node: default routes go into the Gateway's table, which its policy rules consult. It
    // may change at run time (veil set exit-node); a route is removed from the table it went to.
    internal volatile int DefaultRouteTable = Netlink.RT_TABLE_MAIN;
    private int TableOf(IpPrefix p) => p.Bits == 0 ? DefaultRouteTable : Netlink.RT_TABLE_MAIN;
    private Dictionary<IpPrefix, string> _conflicts = new();
    // Replaced whole after each Sync: the status view reads it on the loop thread.
    internal volatile IReadOnlyDictionary<IpPrefix, string> Conflicts = new Dictionary<IpPrefix, string>();

    /// <summary>The kernel dropped our IPv4 (or IPv6) routes on the TUN (its last address of that
    /// family went): the next Sync adds them again.</summary>
    internal void Flushed(bool v6)
    {
        foreach (IpPrefix pr in new List<IpPrefix>(_installed.Keys)) if (pr.IsV6 == v6) _installed.Remove(pr);
    }

    internal void Sync(List<IpPrefix> prefixes)
    {
        var want = new HashSet<IpPrefix>(prefixes);
        foreach (IpPrefix pr in new List<IpPrefix>(_installed.Keys))
        {
            if (want.Contains(pr)) continue;
            _installed.Remove(pr, out int table);
            if (Netlink.RemoveRoute(ifIndex, pr, table) is int e and < 0 && e != -Libc.ESRCH)
                log.Warn("route_failed", $"prefix={pr} op=remove error=\"{Libc.ErrorText(-e)}\"");
            else log.Info("route_removed", $"prefix={pr}");
        }
        var conflicts = new Dictionary<IpPrefix, string>();
        foreach (IpPrefix pr in want)
        {
            if (!_installed.ContainsKey(pr))
            {
                int e = Netlink.AddRoute(ifIndex, pr, TableOf(pr));
                // "Exists" is no conflict when the route is the kernel's own on our interface (the
                // subnet of --address): it carries the traffic to us as well. Another's is left alone.
                if (e == -Libc.EEXIST && Netlink.RouteOif(pr) == ifIndex) continue;
                if (e == -Libc.EEXIST) conflicts[pr] = "the main table has another route for it (not Veil's), so it is not installed";
                else if (e < 0) log.Warn("route_failed", $"prefix={pr} op=add error=\"{Libc.ErrorText(-e)}\"");
                else { _installed[pr] = TableOf(pr); log.Info("route_added", $"prefix={pr}"); }
            }
            // Installed, but does the kernel use it? A more specific route elsewhere, or an equal one
            // that came first, takes the traffic (`ip route get`). A default route is left out: what
            // it covers is anything no other route takes.
            if (_installed.ContainsKey(pr) && pr.Bits > 0 && Netlink.RouteOif(pr) is int oif and > 0 && oif != ifIndex)
                conflicts[pr] = $"traffic for it leaves by {Netlink.IfName(oif)}: another route shadows ours";
        }
        foreach (var (pr, why) in conflicts)
            if (!_conflicts.TryGetValue(pr, out string? was) || was != why)
                log.Warn("route_conflict", $"prefix={pr} reason=\"{why}\" hint=\"veil doctor explains; remove or narrow the other route, or the peer's allowed_ips\"");
        foreach (IpPrefix pr in _conflicts.Keys)
            if (!conflicts.ContainsKey(pr) && want.Contains(pr) && _installed.ContainsKey(pr)) log.Info("route_conflict_resolved", $"prefix={pr}");
        _conflicts = conflicts;
        Conflicts = new Dictionary<IpPrefix, string>(conflicts);
    }
}

/// <summary>Exit nodes (--exit, --exit-node). The exit forwards for members and masquerades their
/// overlay sources out of its other interfaces. A client sends its traffic into the tunnel the way
/// wg-quick does: its default routes live in table 51820, consulted by the rule "not fwmark
/// 0xca6c" (the UDP sockets mark their packets, so the tunnel never carries itself); with
/// --exit-allow-lan, "lookup main suppress_prefixlength 0" first lets every route of the main
/// table but its default win (the LAN, the underlay); without it, the LAN goes to the exit too and
/// only the overlay (our own routing, inside the tunnel) and local addresses stay. A router client also masquerades what it
/// forwards for its LAN into the tunnel. Rules carry our protocol and are removed at exit, and at
/// start when a crashed run left them; the NAT table is owned by our netlink socket, so the kernel
/// drops it the moment the process ends, however it ends.</summary>
internal sealed class Gateway(string tunName, int tunIndex, List<IpPrefix> networks, Log log) : IDisposable
{
    internal const int Table = 51820, SuppressPriority = 5208, TablePriority = 5209;
    internal const uint FwMark = 0xca6c;
    private NatTable? _nat, _offered;                   // a client's LAN masquerade; an exit's
    private bool _rules;
    internal string? ExitNode { get; private set; }     // the client's exit in use (null: none)

    /// <summary>--exit: forwarding on (Sysctls puts it back) and the masquerade table.</summary>
    internal void Offer(Sysctls sysctls)
    {
        _offered = NatTable.Open("veil-" + tunName, tunIndex, networks, exit: true);
        sysctls.Set("/proc/sys/net/ipv4/ip_forward", "1", _ => true, "exit");
        sysctls.Set(Sysctls.ConfPath("ipv6", "all", "forwarding"), "1", _ => true, "exit");
        log.Info("exit_offered", $"nat_table=inet:veil-{tunName} networks={string.Join(',', networks)}");
    }

    /// <summary>A strict rp_filter then checks a reply's source with the mark the NAT table gave it
    /// back (MarkRestore), in the main table, as wg-quick does; put back at exit.</summary>
    internal static void ValidMarks(Sysctls sysctls, bool on)
    {
        string path = Sysctls.ConfPath("ipv4", "all", "src_valid_mark");
        if (on) sysctls.Set(path, "1", _ => true, "exit_node");
        else sysctls.Restore(path);
    }

    /// <summary>--exit-node NAME, or none (null): the rules and the LAN masquerade follow; the
    /// sockets' mark is the caller's. On failure nothing of the new choice stays (IOException).</summary>
    internal void Use(string? exitNode, bool allowLan)
    {
        Stop();
        if (exitNode == null) return;
        foreach (bool v6 in new[] { false, true })
        {
            int e = allowLan ? Netlink.Rule(true, v6, SuppressPriority, Netlink.RT_TABLE_MAIN, 0, suppress: true) : 0;
            if (e == 0) e = Netlink.Rule(true, v6, TablePriority, Table, FwMark, suppress: false);
            // The kill switch: with the exit down (its default route gone), traffic is refused here
            // instead of leaving unencrypted by the main table's default route.
            if (e == 0 && Netlink.Unreachable(true, v6, Table) is int u and < 0 && u != -Libc.EEXIST) e = u;
            _rules = true;
            if (e < 0)
            {
                Stop();
                throw new IOException($"cannot add the policy rules of --exit-node ({(v6 ? "IPv6" : "IPv4")}): {Libc.ErrorText(-e)}");
            }
        }
        try { _nat = NatTable.Open("veil-" + tunName, tunIndex, networks, exit: false); }
        catch (IOException) { Stop(); throw; }
        ExitNode = exitNode;
        log.Info("exit_node_selected", $"exit_node={exitNode} table={Table} fwmark=0x{FwMark:x} lan={(allowLan ? "allowed" : "through_exit")}");
    }

    private void Stop()
    {
        if (_rules || ExitNode != null) RemoveRules();
        _nat?.Dispose();
        _nat = null;
        _rules = false;
        if (ExitNode != null) log.Info("exit_node_released", $"exit_node={ExitNode}");
        ExitNode = null;
    }

    /// <summary>Our rules, by priority and protocol: at start (what a crashed run left) and at stop.</summary>
    internal static void RemoveRules()
    {
        foreach (bool v6 in new[] { false, true })
        {
            foreach (int priority in new[] { SuppressPriority, TablePriority })
                for (int i = 0; i < 8 && Netlink.Rule(false, v6, priority, 0, 0, false) == 0; i++) { }
            for (int i = 0; i < 8 && Netlink.Unreachable(false, v6, Table) == 0; i++) { }
        }
    }

    public void Dispose()
    {
        Stop();
        if (_offered == null) return;
        _offered.Dispose();
        _offered = null;
        log.Info("gateway_removed", "nat_table=removed");
    }
}

/// <summary>Masquerading in a table of our own, made over netlink (nf_tables' messages, the way the
/// nft tool sends them: one batch, every message acknowledged). NFT_TABLE_F_OWNER ties the table to
/// this socket: closing it (Dispose, or the process dying) deletes the table with its rules.
/// The exit: source in an overlay network, leaving by another interface: masquerade. A client:
/// leaving by the TUN, source in none of the overlay networks (a LAN host): masquerade.</summary>
internal sealed unsafe class NatTable : IDisposable
{
    private const int NETLINK_NETFILTER = 12;
    private const ushort NFNL_SUBSYS_NFTABLES = 10, NFNL_MSG_BATCH_BEGIN = 0x10, NFNL_MSG_BATCH_END = 0x11;
    private const ushort NFT_MSG_NEWTABLE = 0, NFT_MSG_NEWCHAIN = 3, NFT_MSG_NEWRULE = 6;
    private const ushort NLM_F_REQUEST = 1, NLM_F_ACK = 4, NLM_F_EXCL = 0x200, NLM_F_CREATE = 0x400, NLM_F_APPEND = 0x800, NLA_F_NESTED = 0x8000;
    private const byte NFPROTO_INET = 1, NFPROTO_IPV4 = 2, NFPROTO_IPV6 = 10;
    private const uint NFT_TABLE_F_OWNER = 2, NF_INET_PRE_ROUTING = 0, NF_INET_POST_ROUTING = 4, NFT_REG_1 = 1, NFT_META_MARK = 3, NFT_META_OIF = 5, NFT_META_NFPROTO = 15;
    private const uint NFT_CT_MARK = 3, MarkPriority = unchecked((uint)-150);   // mangle's place
    private const uint NFT_CMP_EQ = 0, NFT_CMP_NEQ = 1, NFT_PAYLOAD_NETWORK_HEADER = 1, NatPriority = 100;
    private int _fd;

    private NatTable(int fd) => _fd = fd;

    internal const int MaxNetworks = 8;                  // what one batch of rules holds

    internal static NatTable Open(string name, int tunIndex, List<IpPrefix> networks, bool exit)
    {
        if (networks.Count > MaxNetworks) throw new IOException($"at most {MaxNetworks} --network prefixes with --exit or --exit-node");
        int fd = Libc.Socket(Libc.AF_NETLINK, Libc.SOCK_RAW | Libc.SOCK_CLOEXEC, NETLINK_NETFILTER);
        if (fd < 0) throw new IOException($"cannot open nftables' netlink socket: {Libc.ErrorText(Libc.Errno)}");
        var b = new Batch();
        int at = b.Begin(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        b.End(at);
        at = b.Begin(Nft(NFT_MSG_NEWTABLE), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, NFPROTO_INET, 0);
        b.Str(1, name); b.Be32(2, NFT_TABLE_F_OWNER);                           // NFTA_TABLE_NAME, _FLAGS
        b.End(at);
        at = b.Begin(Nft(NFT_MSG_NEWCHAIN), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE, NFPROTO_INET, 0);
        b.Str(1, name); b.Str(3, "postrouting");                                // NFTA_CHAIN_TABLE, _NAME
        int hook = b.Nest(4);                                                   // NFTA_CHAIN_HOOK
        b.Be32(1, NF_INET_POST_ROUTING); b.Be32(2, NatPriority);                // NFTA_HOOK_HOOKNUM, _PRIORITY
        b.EndNest(hook);
        b.Str(7, "nat");                                                        // NFTA_CHAIN_TYPE
        b.End(at);
        int acks = 2;
        if (!exit) acks += MarkRestore(b, name);
        Span<byte> oif = stackalloc byte[4];
        BinaryPrimitives.WriteInt32LittleEndian(oif, tunIndex);                  // the meta key holds it in host order
        foreach (bool v6 in new[] { false, true })
        {
            List<IpPrefix> mine = networks.FindAll(n => n.IsV6 == v6);
            if (mine.Count == 0) continue;
            // The exit: one rule per network (any of them); a client: one rule, none of them.
            foreach (List<IpPrefix> group in exit ? mine.ConvertAll(n => new List<IpPrefix> { n }) : [mine])
            {
                at = b.Begin(Nft(NFT_MSG_NEWRULE), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND, NFPROTO_INET, 0);
                b.Str(1, name); b.Str(2, "postrouting");                        // NFTA_RULE_TABLE, _CHAIN
                int exprs = b.Nest(4);                                          // NFTA_RULE_EXPRESSIONS
                Meta(b, NFT_META_NFPROTO);
                Cmp(b, NFT_CMP_EQ, [v6 ? NFPROTO_IPV6 : NFPROTO_IPV4]);
                foreach (IpPrefix n in group) SourceIn(b, n, exit ? NFT_CMP_EQ : NFT_CMP_NEQ);
                Meta(b, NFT_META_OIF);
                Cmp(b, exit ? NFT_CMP_NEQ : NFT_CMP_EQ, oif);
                int e = b.Nest(1);                                              // NFTA_LIST_ELEM
                b.Str(1, "masq");                                               // NFTA_EXPR_NAME, no data
                b.EndNest(e);
                b.EndNest(exprs);
                b.End(at);
                acks++;
            }
        }
        at = b.Begin(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        b.End(at);
        int err = b.Send(fd, acks);
        if (err < 0)
        {
            Libc.Close(fd);
            throw new IOException($"cannot create the nftables table {name} for masquerading: {Libc.ErrorText(-err)}" +
                (err == -Libc.ENOENT || err == -Libc.EOPNOTSUPP ? " (the kernel lacks nf_tables NAT: kmod-nft-nat)" : ""));
        }
        return new NatTable(fd);
    }

    private static ushort Nft(ushort msg) => (ushort)(NFNL_SUBSYS_NFTABLES << 8 | msg);

    // A client's tunnel packets carry FwMark; their replies come in unmarked, so a strict rp_filter
    // (with src_valid_mark) would look their source up in table 51820, find the TUN and drop them.
    // As wg-quick does: postrouting saves the mark in the connection ("ct mark set mark"), prerouting
    // gives it back to the replies ("mark set ct mark"), for our mark only (others' marks untouched).
    private static int MarkRestore(Batch b, string name)
    {
        Span<byte> mark = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32LittleEndian(mark, Gateway.FwMark);         // registers hold it in host order
        foreach (bool save in new[] { true, false })
        {
            string chain = save ? "markout" : "markin";
            int at = b.Begin(Nft(NFT_MSG_NEWCHAIN), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE, NFPROTO_INET, 0);
            b.Str(1, name); b.Str(3, chain);
            int hook = b.Nest(4);
            b.Be32(1, save ? NF_INET_POST_ROUTING : NF_INET_PRE_ROUTING); b.Be32(2, MarkPriority);
            b.EndNest(hook);
            b.Str(7, "filter");
            b.End(at);
            at = b.Begin(Nft(NFT_MSG_NEWRULE), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND, NFPROTO_INET, 0);
            b.Str(1, name); b.Str(2, chain);
            int exprs = b.Nest(4);
            if (save) Meta(b, NFT_META_MARK); else Ct(b, load: true);
            Cmp(b, NFT_CMP_EQ, mark);
            if (save) Ct(b, load: false); else MetaSet(b, NFT_META_MARK);
            b.EndNest(exprs);
            b.End(at);
        }
        return 4;
    }

    // ct mark into register 1 (load), or register 1 into the connection's mark.
    private static void Ct(Batch b, bool load)
    {
        int e = b.Nest(1); b.Str(1, "ct"); int d = b.Nest(2);
        b.Be32(2, NFT_CT_MARK);                                                 // NFTA_CT_KEY
        b.Be32(load ? (ushort)1 : (ushort)4, NFT_REG_1);                        // NFTA_CT_DREG / _SREG
        b.EndNest(d); b.EndNest(e);
    }

    private static void MetaSet(Batch b, uint key)
    {
        int e = b.Nest(1); b.Str(1, "meta"); int d = b.Nest(2);
        b.Be32(2, key); b.Be32(3, NFT_REG_1);                                   // NFTA_META_KEY, _SREG
        b.EndNest(d); b.EndNest(e);
    }

    // Expressions: NFTA_LIST_ELEM { NFTA_EXPR_NAME, NFTA_EXPR_DATA { ... } }, registers and numbers big-endian.
    private static void Meta(Batch b, uint key)
    {
        int e = b.Nest(1); b.Str(1, "meta"); int d = b.Nest(2);
        b.Be32(1, NFT_REG_1); b.Be32(2, key);                                   // NFTA_META_DREG, _KEY
        b.EndNest(d); b.EndNest(e);
    }

    private static void Cmp(Batch b, uint op, ReadOnlySpan<byte> value)
    {
        int e = b.Nest(1); b.Str(1, "cmp"); int d = b.Nest(2);
        b.Be32(1, NFT_REG_1); b.Be32(2, op);                                    // NFTA_CMP_SREG, _OP
        int v = b.Nest(3); b.Attr(1, value); b.EndNest(v);                      // NFTA_CMP_DATA { NFTA_DATA_VALUE }
        b.EndNest(d); b.EndNest(e);
    }

    // The source address (IPv4 at 12, IPv6 at 8 of the network header), masked to the prefix, compared.
    private static void SourceIn(Batch b, IpPrefix n, uint op)
    {
        int len = n.IsV6 ? 16 : 4;
        int e = b.Nest(1); b.Str(1, "payload"); int d = b.Nest(2);
        b.Be32(1, NFT_REG_1); b.Be32(2, NFT_PAYLOAD_NETWORK_HEADER); b.Be32(3, n.IsV6 ? 8u : 12u); b.Be32(4, (uint)len);
        b.EndNest(d); b.EndNest(e);
        // SkipLocalsInit: stackalloc'd memory is not zeroed.
        Span<byte> mask = stackalloc byte[len], net = stackalloc byte[16], zeros = stackalloc byte[len];
        mask.Clear(); net.Clear(); zeros.Clear();
        for (int i = 0; i < n.Bits; i++) mask[i / 8] |= (byte)(0x80 >> (i % 8));
        n.WriteAddress(net);
        e = b.Nest(1); b.Str(1, "bitwise"); d = b.Nest(2);
        b.Be32(1, NFT_REG_1); b.Be32(2, NFT_REG_1); b.Be32(3, (uint)len);     // NFTA_BITWISE_SREG, _DREG, _LEN
        int m = b.Nest(4); b.Attr(1, mask); b.EndNest(m);                       // NFTA_BITWISE_MASK
        int x = b.Nest(5); b.Attr(1, zeros); b.EndNest(x);                      // NFTA_BITWISE_XOR
        b.EndNest(d); b.EndNest(e);
        Cmp(b, op, net[..len]);
    }

    public void Dispose()
    {
        if (_fd >= 0) Libc.Close(_fd);                   // the kernel deletes the owned table with it
        _fd = -1;
    }

    /// <summary>netlink messages (nlmsghdr, nfgenmsg, attributes) built into one datagram.</summary>
    private sealed class Batch
    {
        private readonly byte[] _b = new byte[4096];
        private int _len;
        private uint _seq;

        internal int Begin(ushort type, ushort flags, byte family, ushort resId)
        {
            int at = _len;
            BinaryPrimitives.WriteUInt16LittleEndian(_b.AsSpan(at + 4), type);
            BinaryPrimitives.WriteUInt16LittleEndian(_b.AsSpan(at + 6), flags);
            BinaryPrimitives.WriteUInt32LittleEndian(_b.AsSpan(at + 8), ++_seq);
            _b[at + 16] = family;
            _b[at + 17] = 0;                                                    // NFNETLINK_V0
            BinaryPrimitives.WriteUInt16BigEndian(_b.AsSpan(at + 18), resId);
            _len = at + 20;
            return at;
        }

        internal void End(int at) => BinaryPrimitives.WriteUInt32LittleEndian(_b.AsSpan(at), (uint)(_len - at));

        internal void Attr(ushort type, ReadOnlySpan<byte> data)
        {
            BinaryPrimitives.WriteUInt16LittleEndian(_b.AsSpan(_len), (ushort)(4 + data.Length));
            BinaryPrimitives.WriteUInt16LittleEndian(_b.AsSpan(_len + 2), type);
            data.CopyTo(_b.AsSpan(_len + 4));
            _b.AsSpan(_len + 4 + data.Length, (4 - data.Length % 4) % 4).Clear();
            _len += (4 + data.Length + 3) & ~3;
        }

        internal void Str(ushort type, string s)
        {
            Span<byte> z = stackalloc byte[s.Length + 1];
            Encoding.ASCII.GetBytes(s, z);
            z[^1] = 0;
            Attr(type, z);
        }

        internal void Be32(ushort type, uint v)
        {
            Span<byte> d = stackalloc byte[4];
            BinaryPrimitives.WriteUInt32BigEndian(d, v);
            Attr(type, d);
        }

        internal int Nest(ushort type)
        {
            int at = _len;
            BinaryPrimitives.WriteUInt16LittleEndian(_b.AsSpan(at + 2), (ushort)(type | NLA_F_NESTED));
            _len += 4;
            return at;
        }

        internal void EndNest(int at) => BinaryPrimitives.WriteUInt16LittleEndian(_b.AsSpan(at), (ushort)(_len - at));

        /// <summary>Sends the batch and reads an acknowledgement per message: 0, or the first error.</summary>
        internal int Send(int fd, int acks)
        {
            byte* sa = stackalloc byte[12];
            new Span<byte>(sa, 12).Clear();
            *(ushort*)sa = (ushort)Libc.AF_NETLINK;
            fixed (byte* p = _b)
                if (Libc.SendTo(fd, p, (nuint)_len, 0, sa, 12) < 0) return -Libc.Errno;
            byte[] reply = new byte[8192];
            // The kernel answers while it handles the send, so every ack is queued by now; a bounded
            // number of reads, without waiting, takes them.
            for (int reads = 0; acks > 0 && reads < 64; reads++)
            {
                nint n;
                fixed (byte* p = reply) n = Libc.RecvFrom(fd, p, (nuint)reply.Length, Libc.MSG_DONTWAIT, null, null);
                if (n < 0 && Libc.Errno == Libc.EINTR) continue;
                if (n < 0) return Libc.Errno == Libc.EAGAIN ? -Libc.ETIMEDOUT : -Libc.Errno;
                for (int at = 0; at + 20 <= n;)
                {
                    int len = (int)BinaryPrimitives.ReadUInt32LittleEndian(reply.AsSpan(at));
                    if (len < 16 || at + len > n) break;
                    if (BinaryPrimitives.ReadUInt16LittleEndian(reply.AsSpan(at + 4)) == 2)   // NLMSG_ERROR
                    {
                        int err = BinaryPrimitives.ReadInt32LittleEndian(reply.AsSpan(at + 16));
                        if (err < 0) return err;
                        acks--;
                    }
                    at += (len + 3) & ~3;
                }
            }
            return acks == 0 ? 0 : -Libc.ETIMEDOUT;
        }
    }
}

/// <summary>Decides which received packets may travel to the TUN as one super-packet: TCP segments
/// of one flow with the same header shape, consecutive sequence numbers, only ACK (the last may add
/// PSH); with USO, UDP datagrams of one flow (the kernel cuts them apart again at the same
/// boundaries). Equal sizes (a shorter one ends the run), IPv4 without options or fragments, at most
/// 64 KiB.</summary>
internal static class Coalescer
{
    private const int MaxBytes = 65535 - 60, MaxSegments = 64;

    internal static int IpHeaderLen(ReadOnlySpan<byte> p) => Ip.Version(p) == 6 ? Ip.V6HeaderLen : (p[0] & 0xF) * 4;
    internal static bool IsUdp(ReadOnlySpan<byte> p) => (Ip.Version(p) == 6 ? p[Ip.V6NextHeaderOffset] : p[Ip.V4ProtocolOffset]) == Ip.ProtocolUdp;
    internal static int HeaderLen(ReadOnlySpan<byte> p) { int ip = IpHeaderLen(p); return ip + (IsUdp(p) ? 8 : (p[ip + 12] >> 4) * 4); }

    // A plain TCP segment we know how to merge: IPv4 with a 20-byte header and no fragmenting, or
    // IPv6 with TCP as the next header; a whole TCP header; some payload.
    private static bool Mergeable(ReadOnlySpan<byte> p)
    {
        if (p.Length < 40) return false;
        int v = Ip.Version(p);
        if (v == 4) { if (p[0] != 0x45 || p[Ip.V4ProtocolOffset] != Ip.ProtocolTcp || (BinaryPrimitives.ReadUInt16BigEndian(p[Ip.V4FragmentOffset..]) & 0x3FFF) != 0) return false; }
        else if (v != 6 || p.Length < 60 || p[Ip.V6NextHeaderOffset] != Ip.ProtocolTcp) return false;
        int ip = IpHeaderLen(p), tcp = (p[ip + 12] >> 4) * 4;
        if (tcp < 20 || ip + tcp >= p.Length) return false;
        byte flags = p[ip + 13];
        return flags is 0x10 or 0x18;                                 // ACK, or ACK|PSH
    }

    // A UDP datagram we know how to merge: IPv4 with a 20-byte header and no fragmenting, or IPv6
    // with UDP as the next header; a UDP length that is the IP payload; some payload.
    private static bool MergeableUdp(ReadOnlySpan<byte> p)
    {
        int v = p.Length >= 29 ? Ip.Version(p) : 0;
        if (v == 4) { if (p[0] != 0x45 || p[Ip.V4ProtocolOffset] != Ip.ProtocolUdp || (BinaryPrimitives.ReadUInt16BigEndian(p[Ip.V4FragmentOffset..]) & 0x3FFF) != 0) return false; }
        else if (v != 6 || p.Length < 49 || p[Ip.V6NextHeaderOffset] != Ip.ProtocolUdp) return false;
        int ip = IpHeaderLen(p);
        return BinaryPrimitives.ReadUInt16BigEndian(p[(ip + 4)..]) == p.Length - ip;
    }

    /// <summary>The end (exclusive) of the run of slots starting at i that can be merged with it
    /// (UDP runs only when the TUN takes UDP super-packets).</summary>
    internal static int RunEnd(PacketBatch b, int i, bool udp = false, int link = 0)
    {
        ReadOnlySpan<byte> head = b.Packet(i)[link..];
        if (udp && MergeableUdp(head)) return UdpRunEnd(b, i, link);
        if (!Mergeable(head) || head[IpHeaderLen(head) + 13] != 0x10) return i + 1;
        int ip = IpHeaderLen(head), hdr = HeaderLen(head), seg = head.Length - hdr, total = head.Length, n = 1;
        uint next = BinaryPrimitives.ReadUInt32BigEndian(head[(ip + 4)..]) + (uint)seg;
        int j = i + 1, last = i;
        for (; j < b.Count && n < MaxSegments; j++)
        {
            if (b.Length[j] == 0) continue;
            ReadOnlySpan<byte> p = SameLink(b, i, j, link);
            if (!Mergeable(p) || HeaderLen(p) != hdr || total + p.Length - hdr > MaxBytes) break;
            int len = p.Length - hdr;
            if (len > seg || BinaryPrimitives.ReadUInt32BigEndian(p[(ip + 4)..]) != next) break;
            // same ports, ack, window, header options
            if (!SameIpFields(head, p) || !head.Slice(ip, 4).SequenceEqual(p.Slice(ip, 4)) || !head.Slice(ip + 8, 4).SequenceEqual(p.Slice(ip + 8, 4)) ||
                !head.Slice(ip + 14, 2).SequenceEqual(p.Slice(ip + 14, 2)) || !head.Slice(ip + 20, hdr - ip - 20).SequenceEqual(p.Slice(ip + 20, hdr - ip - 20)))
                break;
            n++;
            total += len;
            next += (uint)len;
            last = j;
            if (len < seg || p[ip + 13] != 0x10) { j++; break; }     // a short or PSH segment closes the run
        }
        return last + 1;
    }

    // Same addresses; IPv4: same TOS and TTL; IPv6: same class, flow label and hop limit (head's version decides).
    private static bool SameIpFields(ReadOnlySpan<byte> head, ReadOnlySpan<byte> p) =>
        (head[0] >> 4) == 4
            ? head[1] == p[1] && head[8] == p[8] && head.Slice(12, 8).SequenceEqual(p.Slice(12, 8))
            : head[..4].SequenceEqual(p[..4]) && head[7] == p[7] && head.Slice(8, 32).SequenceEqual(p.Slice(8, 32));

    // Frames of a TAP (link > 0) merge only behind the same Ethernet header (addresses, tag, type):
    // the IP packet of slot j, or nothing (which merges with nothing).
    private static ReadOnlySpan<byte> SameLink(PacketBatch b, int i, int j, int link)
    {
        ReadOnlySpan<byte> p = b.Packet(j);
        return link == 0 ? p : p.Length > link && p[..link].SequenceEqual(b.Packet(i)[..link]) ? p[link..] : default;
    }

    private static int UdpRunEnd(PacketBatch b, int i, int link)
    {
        ReadOnlySpan<byte> head = b.Packet(i)[link..];
        bool v4 = (head[0] >> 4) == 4;
        int ip = IpHeaderLen(head), hdr = ip + 8, seg = head.Length - hdr, total = head.Length, n = 1, last = i;
        for (int j = i + 1; j < b.Count && n < MaxSegments; j++)
        {
            if (b.Length[j] == 0) continue;
            ReadOnlySpan<byte> p = SameLink(b, i, j, link);
            if (!MergeableUdp(p) || (p[0] >> 4) != (head[0] >> 4)) break;
            int len = p.Length - hdr;
            if (len > seg || total + len > MaxBytes) break;
            // same ports; IPv4 also the same DF
            if (!SameIpFields(head, p) || v4 && head[6] != p[6] || !head.Slice(ip, 4).SequenceEqual(p.Slice(ip, 4))) break;
            n++;
            total += len;
            last = j;
            if (len < seg) break;                                      // a short datagram closes the run
        }
        return last + 1;
    }

    /// <summary>Makes the head's headers describe the whole run: IP length (and IPv4 checksum); TCP:
    /// PSH if the last segment had it; UDP: the length; the L4 checksum field seeded with the
    /// pseudo-header sum.</summary>
    internal static void RewriteHead(Span<byte> head, int hdrLen, int ipLen, int payload, ReadOnlySpan<byte> last)
    {
        int l4Len = hdrLen - ipLen + payload;
        bool v6 = (head[0] >> 4) == 6, udp = IsUdp(head);
        if (v6) BinaryPrimitives.WriteUInt16BigEndian(head[4..], (ushort)l4Len);
        else
        {
            BinaryPrimitives.WriteUInt16BigEndian(head[2..], (ushort)(ipLen + l4Len));
            head[10] = 0; head[11] = 0;
            BinaryPrimitives.WriteUInt16BigEndian(head[10..], (ushort)~Checksum.Fold(Checksum.Add(0, head[..ipLen])));
        }
        if (udp) BinaryPrimitives.WriteUInt16BigEndian(head[(ipLen + 4)..], (ushort)l4Len);
        else head[ipLen + 13] |= (byte)(last[ipLen + 13] & 0x08);
        ulong pseudo = Checksum.Add(Checksum.Add(0, v6 ? head.Slice(8, 32) : head.Slice(12, 8)), (uint)l4Len) + (udp ? 17u : 6u);
        BinaryPrimitives.WriteUInt16BigEndian(head[(ipLen + (udp ? 6 : 16))..], Checksum.Fold(pseudo));
    }
}

/// <summary>Turns what a TUN with offloads hands us (virtio_net_hdr + packet) into plain packets:
/// finishes a checksum the kernel left partial (NEEDS_CSUM), and cuts a super-packet into gso_size
/// segments with their own IP length, IPv4 id and checksum: TCP (GSO TCPV4/TCPV6) with its sequence
/// number, flags (FIN/PSH only on the last, CWR only on the first) and full checksum; UDP (GSO UDP_L4,
/// from senders using UDP_SEGMENT) as datagrams with their own UDP length and checksum.
/// Nothing here trusts the header's lengths without checking them against the packet.</summary>
internal sealed class Segmenter
{
    internal const int VirtioHdrLen = 10;
    internal const byte NeedsCsum = 1, GsoNone = 0, GsoTcpV4 = 1, GsoTcpV6 = 4, GsoUdpL4 = 5;   // virtio_net.h
    private byte[] _pkt = [];
    private int _len, _link, _l4, _hdrLen, _gsoSize, _payloadLen, _next, _count;
    private bool _v6, _udp, _whole;
    internal bool Tap;                               // reads are Ethernet frames: segments keep their header
    internal long Malformed;
    internal bool Whole => _whole;                    // the last Start held one plain packet (no GSO)

    /// <summary>Takes one read (header + packet); false when it is malformed (dropped).</summary>
    internal bool Start(ReadOnlySpan<byte> read)
    {
        _count = _next = 0;
        _whole = false;
        if (read.Length < VirtioHdrLen + 20) return Bad();
        byte flags = read[0], gso = read[1];
        int gsoSize = BinaryPrimitives.ReadUInt16LittleEndian(read[4..]);
        int csumStart = BinaryPrimitives.ReadUInt16LittleEndian(read[6..]), csumOffset = BinaryPrimitives.ReadUInt16LittleEndian(read[8..]);
        ReadOnlySpan<byte> p = read[VirtioHdrLen..];
        if (_pkt.Length < p.Length) _pkt = GC.AllocateUninitializedArray<byte>(65535, pinned: true);
        p.CopyTo(_pkt);
        _len = p.Length;
        Span<byte> pkt = _pkt.AsSpan(0, _len);
        if ((gso & 0x7F) == GsoNone)
        {
            if ((flags & NeedsCsum) != 0)
            {
                if (csumStart + csumOffset + 2 > _len) return Bad();
                ushort sum = (ushort)~Checksum.Fold(Checksum.Add(0, pkt[csumStart..]));
                if (sum == 0 && csumOffset == 6) sum = 0xFFFF;          // UDP sends a zero checksum as all ones
                BinaryPrimitives.WriteUInt16BigEndian(pkt[(csumStart + csumOffset)..], sum);
            }
            _count = 1;
            _whole = true;
            return true;
        }
        int type = gso & 0x7F;
        if (type is not (GsoTcpV4 or GsoTcpV6 or GsoUdpL4) || gsoSize == 0) return Bad();
        // From here on offsets count from the IP header: a frame's Ethernet header is copied in
        // front of every segment as it is.
        _link = Tap ? Ethernet.IpOffset(pkt) : 0;
        if (_link < 0 || csumStart < _link) return Bad();
        pkt = pkt[_link..];
        csumStart -= _link;
        _udp = type == GsoUdpL4;
        _v6 = _udp ? (pkt[0] >> 4) == 6 : type == GsoTcpV6;               // UDP_L4 serves both versions
        if ((pkt[0] >> 4) != (_v6 ? 6 : 4)) return Bad();
        _l4 = csumStart;
        if (_l4 < (_v6 ? 40 : 20) || _l4 + (_udp ? 8 : 20) > pkt.Length) return Bad();
        if (!_v6 && ((pkt[0] & 0xF) * 4 < 20 || (pkt[0] & 0xF) * 4 > _l4)) return Bad();   // IPv4 header must end where L4 starts
        int l4HdrLen = _udp ? 8 : (pkt[_l4 + 12] >> 4) * 4;
        if (l4HdrLen < (_udp ? 8 : 20) || _l4 + l4HdrLen > pkt.Length) return Bad();
        _hdrLen = _l4 + l4HdrLen;
        _payloadLen = pkt.Length - _hdrLen;
        _gsoSize = gsoSize;
        _count = Math.Max(1, (_payloadLen + gsoSize - 1) / gsoSize);
        return true;
    }

    private bool Bad()
    {
        Malformed++;
        _count = 0;
        return false;
    }

    /// <summary>Writes the next segment into dst; 0 when the super-packet is used up.</summary>
    internal int Next(Span<byte> dst)
    {
        if (_next >= _count) return 0;
        int i = _next++;
        if (_whole)
        {
            if (_len > dst.Length) { Malformed++; return 0; }
            _pkt.AsSpan(0, _len).CopyTo(dst);
            return _len;
        }
        int off = i * _gsoSize, seg = Math.Min(_gsoSize, _payloadLen - off), total = _hdrLen + seg;
        if (_link + total > dst.Length) { Malformed++; _next = _count; return 0; }
        _pkt.AsSpan(0, _link + _hdrLen).CopyTo(dst);
        _pkt.AsSpan(_link + _hdrLen + off, seg).CopyTo(dst[(_link + _hdrLen)..]);
        Span<byte> o = dst.Slice(_link, total);
        if (_v6) BinaryPrimitives.WriteUInt16BigEndian(o[4..], (ushort)(total - 40));
        else
        {
            BinaryPrimitives.WriteUInt16BigEndian(o[2..], (ushort)total);
            BinaryPrimitives.WriteUInt16BigEndian(o[4..], (ushort)(BinaryPrimitives.ReadUInt16BigEndian(o[4..]) + i));
            int ihl = (o[0] & 0xF) * 4;
            o[10] = 0; o[11] = 0;
            BinaryPrimitives.WriteUInt16BigEndian(o[10..], (ushort)~Checksum.Fold(Checksum.Add(0, o[..ihl])));
        }
        Span<byte> l4 = o[_l4..];
        int csumAt;
        if (_udp)
        {
            BinaryPrimitives.WriteUInt16BigEndian(l4[4..], (ushort)l4.Length);
            csumAt = 6;
        }
        else
        {
            BinaryPrimitives.WriteUInt32BigEndian(l4[4..], BinaryPrimitives.ReadUInt32BigEndian(l4[4..]) + (uint)off);
            if (i < _count - 1) l4[13] &= unchecked((byte)~0x09);   // FIN and PSH only on the last segment
            if (i > 0) l4[13] &= unchecked((byte)~0x80);             // CWR only on the first
            csumAt = 16;
        }
        l4[csumAt] = 0; l4[csumAt + 1] = 0;
        ulong sum = Checksum.Add(Checksum.Add(Checksum.Add(0, l4), _v6 ? o.Slice(8, 32) : o.Slice(12, 8)), (uint)l4.Length) + (_udp ? 17u : 6u);
        ushort csum = (ushort)~Checksum.Fold(sum);
        if (csum == 0 && _udp) csum = 0xFFFF;                        // zero would mean "no checksum"
        BinaryPrimitives.WriteUInt16BigEndian(l4[csumAt..], csum);
        return _link + total;
    }
}

/// <summary>The Internet checksum (RFC 1071): big-endian 16-bit words summed with end-around carry.</summary>
internal static class Checksum
{
    internal static ulong Add(ulong sum, ReadOnlySpan<byte> data)
    {
        int i = 0;
        for (; i + 8 <= data.Length; i += 8)
        {
            ulong w = BinaryPrimitives.ReadUInt64BigEndian(data[i..]);
            sum += (w >> 32) + (w & 0xFFFFFFFF);
        }
        for (; i + 2 <= data.Length; i += 2) sum += BinaryPrimitives.ReadUInt16BigEndian(data[i..]);
        if (i < data.Length) sum += (ulong)data[i] << 8;
        return sum;
    }

    internal static ulong Add(ulong sum, uint value) => sum + (value >> 16) + (value & 0xFFFF);

    internal static ushort Fold(ulong sum)
    {
        while (sum > 0xFFFF) sum = (sum >> 16) + (sum & 0xFFFF);
        return (ushort)sum;
    }
}

/// <summary>An in-memory TUN: tests inject packets with Inject and collect what the node wrote.</summary>
internal sealed class LoopbackDataplane : IDataplane
{
    private readonly Queue<byte[]> _toNode = new();
    internal readonly List<byte[]> Written = new();
    public int Fd => -1;
    internal void Inject(ReadOnlySpan<byte> packet) => _toNode.Enqueue(packet.ToArray());
    internal int Pending => _toNode.Count;

    public int Read(Span<byte> buffer)
    {
        if (!_toNode.TryDequeue(out byte[]? p)) return 0;
        p.CopyTo(buffer);
        return p.Length;
    }

    public bool Write(ReadOnlySpan<byte> packet)
    {
        Written.Add(packet.ToArray());
        return true;
    }

    public void Dispose() { }
}

internal static unsafe class Netlink
{
    private const ushort RTM_NEWLINK = 16, RTM_NEWADDR = 20, RTM_DELADDR = 21, RTM_NEWROUTE = 24, RTM_DELROUTE = 25, RTM_GETROUTE = 26, NLMSG_ERROR = 2;
    private const ushort NLM_F_REQUEST = 1, NLM_F_ACK = 4, NLM_F_EXCL = 0x200, NLM_F_CREATE = 0x400;
    private const ushort IFLA_MTU = 4, IFA_ADDRESS = 1, IFA_LOCAL = 2, IFA_FLAGS = 8, RTA_DST = 1, RTA_OIF = 4, RTA_PRIORITY = 6, RTA_TABLE = 15;
    private const ushort RTM_NEWRULE = 32, RTM_DELRULE = 33, FRA_PRIORITY = 6, FRA_FWMARK = 10, FRA_SUPPRESS_PREFIXLEN = 14, FRA_TABLE = 15, FRA_FWMASK = 16, FRA_PROTOCOL = 21;
    private const byte FR_ACT_TO_TBL = 1;
    private const uint FIB_RULE_INVERT = 2;
    private const uint IFF_UP = 1, IFA_F_NODAD = 0x02;
    internal const byte RT_TABLE_MAIN = 254;
    private const byte RT_SCOPE_UNIVERSE = 0, RT_SCOPE_LINK = 253, RTN_UNICAST = 1, RTN_UNREACHABLE = 7;
    internal const byte RouteProtocol = 86;          // our tag on routes we install (rt_protos has no 86)
    private const uint SIOCGIFINDEX = 0x8933, SIOCBRADDIF = 0x89A2;

    /// <summary>Makes ifIndex a port of bridge: 0, or the errno (ENODEV: no such bridge).</summary>
    internal static int AddToBridge(string bridge, int ifIndex)
    {
        int s = Libc.Socket(Libc.AF_INET, Libc.SOCK_DGRAM | Libc.SOCK_CLOEXEC, 0);
        if (s < 0) return Libc.Errno;
        byte* ifr = stackalloc byte[Libc.IfReqLen];
        var req = new Span<byte>(ifr, Libc.IfReqLen);
        req.Clear();
        Encoding.ASCII.GetBytes(bridge, req[..(Libc.IfNameSize - 1)]);
        *(int*)(ifr + Libc.IfNameSize) = ifIndex;
        int r = Libc.Ioctl(s, SIOCBRADDIF, ifr), errno = r < 0 ? Libc.Errno : 0;
        Libc.Close(s);
        return errno;
    }

    /// <summary>The device whose port name is (a bridge's, a bond's), or null.</summary>
    internal static string? MasterOf(string name)
    {
        try { return new FileInfo($"/sys/class/net/{name}/master").LinkTarget is string t ? Path.GetFileName(t) : null; }
        catch (IOException) { return null; }
    }

    internal static int IfIndex(string name)
    {
        int s = Libc.Socket(Libc.AF_INET, Libc.SOCK_DGRAM | Libc.SOCK_CLOEXEC, 0);
        if (s < 0) return -1;
        byte* ifr = stackalloc byte[Libc.IfReqLen];
        var req = new Span<byte>(ifr, Libc.IfReqLen);
        req.Clear();
        Encoding.ASCII.GetBytes(name, req[..(Libc.IfNameSize - 1)]);
        int r = Libc.Ioctl(s, SIOCGIFINDEX, ifr);
        Libc.Close(s);
        return r < 0 ? -1 : *(int*)(ifr + Libc.IfNameSize);
    }

    internal static void SetLinkUp(int ifIndex, int mtu)
    {
        var m = new Msg(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK);
        m.Byte(0); m.Byte(0); m.U16(0); m.I32(ifIndex); m.U32(IFF_UP); m.U32(IFF_UP);   // ifinfomsg
        m.AttrU32(IFLA_MTU, (uint)mtu);
        Check(m.Send(), $"set link {ifIndex} up with mtu {mtu}");
    }

    internal static void AddAddress(int ifIndex, IfAddress a)
    {
        byte[] addr = a.Address.GetAddressBytes();
        var m = new Msg(RTM_NEWADDR, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        m.Byte(a.IsV6 ? (byte)Libc.AF_INET6 : (byte)Libc.AF_INET); m.Byte((byte)a.Bits);
        m.Byte(a.IsV6 ? (byte)IFA_F_NODAD : (byte)0); m.Byte(RT_SCOPE_UNIVERSE); m.I32(ifIndex);   // ifaddrmsg
        m.Attr(IFA_LOCAL, addr);
        m.Attr(IFA_ADDRESS, addr);
        if (a.IsV6) m.AttrU32(IFA_FLAGS, IFA_F_NODAD);
        int err = m.Send();
        if (err != -Libc.EEXIST) Check(err, $"add address {a}");
    }

    internal static int RemoveAddress(int ifIndex, IfAddress a)
    {
        byte[] addr = a.Address.GetAddressBytes();
        var m = new Msg(RTM_DELADDR, NLM_F_REQUEST | NLM_F_ACK);
        m.Byte(a.IsV6 ? (byte)Libc.AF_INET6 : (byte)Libc.AF_INET); m.Byte((byte)a.Bits); m.Byte(0); m.Byte(RT_SCOPE_UNIVERSE); m.I32(ifIndex);
        m.Attr(IFA_LOCAL, addr);
        m.Attr(IFA_ADDRESS, addr);
        return m.Send();
    }

    /// <summary>Adds a route to prefix via the interface: 0, or -EEXIST when the main table has one.</summary>
    internal static int AddRoute(int ifIndex, IpPrefix p, int table = RT_TABLE_MAIN) => RouteOp(RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, ifIndex, p, table);
    internal static int RemoveRoute(int ifIndex, IpPrefix p, int table = RT_TABLE_MAIN) => RouteOp(RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, ifIndex, p, table);

    private static int RouteOp(ushort type, ushort flags, int ifIndex, IpPrefix p, int table)
    {
        Span<byte> addr = stackalloc byte[16];
        p.WriteAddress(addr);
        var m = new Msg(type, flags);
        m.Byte(p.IsV6 ? (byte)Libc.AF_INET6 : (byte)Libc.AF_INET); m.Byte((byte)p.Bits); m.Byte(0); m.Byte(0);   // rtmsg
        // A table past 255 goes in RTA_TABLE, with RT_TABLE_UNSPEC in the header (as iproute2 does).
        m.Byte(table < 256 ? (byte)table : (byte)0); m.Byte(RouteProtocol); m.Byte(RT_SCOPE_LINK); m.Byte(RTN_UNICAST); m.U32(0);
        if (p.Bits > 0) m.Attr(RTA_DST, addr[..(p.IsV6 ? 16 : 4)]);
        m.AttrU32(RTA_OIF, (uint)ifIndex);
        if (table >= 256) m.AttrU32(RTA_TABLE, (uint)table);
        return m.Send();
    }

    /// <summary>Adds (or removes) an unreachable default route at the lowest preference in table:
    /// while the exit's own default route is missing, nothing falls through to the main table.</summary>
    internal static int Unreachable(bool add, bool v6, int table)
    {
        var m = new Msg(add ? RTM_NEWROUTE : RTM_DELROUTE, add ? (ushort)(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL) : (ushort)(NLM_F_REQUEST | NLM_F_ACK));
        m.Byte(v6 ? (byte)Libc.AF_INET6 : (byte)Libc.AF_INET); m.Byte(0); m.Byte(0); m.Byte(0);
        m.Byte(0); m.Byte(RouteProtocol); m.Byte(RT_SCOPE_UNIVERSE); m.Byte(RTN_UNREACHABLE); m.U32(0);
        m.AttrU32(RTA_TABLE, (uint)table);
        m.AttrU32(RTA_PRIORITY, uint.MaxValue);
        return m.Send();
    }

    /// <summary>Adds (or removes) the policy rule "priority P: lookup TABLE", with "not fwmark MARK"
    /// when mark is set and "suppress_prefixlength 0" when suppress is; tagged with our protocol, so
    /// removal by priority and protocol never takes another program's rule.</summary>
    internal static int Rule(bool add, bool v6, int priority, int table, uint mark, bool suppress)
    {
        var m = new Msg(add ? RTM_NEWRULE : RTM_DELRULE, add ? (ushort)(NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL) : (ushort)(NLM_F_REQUEST | NLM_F_ACK));
        m.Byte(v6 ? (byte)Libc.AF_INET6 : (byte)Libc.AF_INET); m.Byte(0); m.Byte(0); m.Byte(0);   // fib_rule_hdr
        m.Byte(table < 256 ? (byte)table : (byte)0); m.Byte(0); m.Byte(0); m.Byte(add ? FR_ACT_TO_TBL : (byte)0);
        m.U32(add && mark != 0 ? FIB_RULE_INVERT : 0);
        m.AttrU32(FRA_PRIORITY, (uint)priority);
        m.Attr(FRA_PROTOCOL, [RouteProtocol]);
        if (add)
        {
            m.AttrU32(FRA_TABLE, (uint)table);
            if (mark != 0) { m.AttrU32(FRA_FWMARK, mark); m.AttrU32(FRA_FWMASK, uint.MaxValue); }
            if (suppress) m.AttrU32(FRA_SUPPRESS_PREFIXLEN, 0);
        }
        return m.Send();
    }

    /// <summary>The interface index a packet to the prefix's first address would leave by, as
    /// `ip route get` says; -1 when the kernel has no answer.</summary>
    internal static int RouteOif(IpPrefix p)
    {
        Span<byte> addr = stackalloc byte[16];
        p.WriteAddress(addr);
        var m = new Msg(RTM_GETROUTE, NLM_F_REQUEST);
        m.Byte(p.IsV6 ? (byte)Libc.AF_INET6 : (byte)Libc.AF_INET); m.Byte(p.IsV6 ? (byte)128 : (byte)32); m.Byte(0); m.Byte(0);   // rtmsg
        m.Byte(0); m.Byte(0); m.Byte(0); m.Byte(0); m.U32(0);
        m.Attr(RTA_DST, addr[..(p.IsV6 ? 16 : 4)]);
        byte[] answer = new byte[1024];
        int n = m.Send(answer);
        // nlmsghdr (16) and rtmsg (12), then the attributes; every length checked before it is used.
        for (int at = 28; n > 0 && at + 4 <= n;)
        {
            int len = BinaryPrimitives.ReadUInt16LittleEndian(answer.AsSpan(at)), type = BinaryPrimitives.ReadUInt16LittleEndian(answer.AsSpan(at + 2));
            if (len < 4 || at + len > n) break;
            if (type == RTA_OIF && len >= 8) return BinaryPrimitives.ReadInt32LittleEndian(answer.AsSpan(at + 4));
            at += (len + 3) & ~3;
        }
        return -1;
    }

    internal static string IfName(int ifIndex)
    {
        try
        {
            foreach (string dir in Directory.GetDirectories("/sys/class/net"))
                if (File.ReadAllText(Path.Combine(dir, "ifindex")).Trim() == ifIndex.ToString()) return Path.GetFileName(dir);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
        return "ifindex " + ifIndex;
    }

    private static void Check(int err, string what)
    {
        if (err < 0) throw new IOException($"netlink: cannot {what}: {Libc.ErrorText(-err)}");
    }

    /// <summary>One rtnetlink request built in a small buffer; Send waits for the kernel's ack.</summary>
    private sealed class Msg
    {
        private readonly byte[] _b = new byte[256];
        private int _len = 16;

        internal Msg(ushort type, ushort flags)
        {
            BinaryPrimitives.WriteUInt16LittleEndian(_b.AsSpan(4), type);
            BinaryPrimitives.WriteUInt16LittleEndian(_b.AsSpan(6), flags);
            BinaryPrimitives.WriteUInt32LittleEndian(_b.AsSpan(8), 1);    // seq
        }

        internal void Byte(byte v) => _b[_len++] = v;
        internal void U16(ushort v) { BinaryPrimitives.WriteUInt16LittleEndian(_b.AsSpan(_len), v); _len += 2; }
        internal void U32(uint v) { BinaryPrimitives.WriteUInt32LittleEndian(_b.AsSpan(_len), v); _len += 4; }
        internal void I32(int v) => U32((uint)v);

        internal void Attr(ushort type, ReadOnlySpan<byte> data)
        {
            int len = 4 + data.Length;
            BinaryPrimitives.WriteUInt16LittleEndian(_b.AsSpan(_len), (ushort)len);
            BinaryPrimitives.WriteUInt16LittleEndian(_b.AsSpan(_len + 2), type);
            data.CopyTo(_b.AsSpan(_len + 4));
            _len += (len + 3) & ~3;
        }

        internal void AttrU32(ushort type, uint v)
        {
            Span<byte> d = stackalloc byte[4];
            BinaryPrimitives.WriteUInt32LittleEndian(d, v);
            Attr(type, d);
        }

        /// <summary>Returns 0 or a negative errno from the kernel's NLMSG_ERROR reply; with answer,
        /// a reply of another type is copied there and its length returned.</summary>
        internal int Send(byte[]? answer = null)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(_b, (uint)_len);
            int fd = Libc.Socket(Libc.AF_NETLINK, Libc.SOCK_RAW | Libc.SOCK_CLOEXEC, Libc.NETLINK_ROUTE);
            if (fd < 0) return -Libc.Errno;
            try
            {
                byte* sa = stackalloc byte[12];
                new Span<byte>(sa, 12).Clear();
                *(ushort*)sa = (ushort)Libc.AF_NETLINK;
                fixed (byte* p = _b)
                    if (Libc.SendTo(fd, p, (nuint)_len, 0, sa, 12) < 0) return -Libc.Errno;
                byte[] reply = new byte[4096];
                for (int tries = 0; tries < 8; tries++)
                {
                    nint n;
                    fixed (byte* p = reply) n = Libc.RecvFrom(fd, p, (nuint)reply.Length, 0, null, null);
                    if (n < 0) return Libc.Errno == Libc.EINTR ? 0 : -Libc.Errno;
                    if (n >= 20 && BinaryPrimitives.ReadUInt16LittleEndian(reply.AsSpan(4)) == NLMSG_ERROR)
                        return BinaryPrimitives.ReadInt32LittleEndian(reply.AsSpan(16));
                    if (answer != null && n >= 16)
                    {
                        int len = (int)Math.Min(n, answer.Length);
                        reply.AsSpan(0, len).CopyTo(answer);
                        return len;
                    }
                }
                return -Libc.EAGAIN;
            }
            finally { Libc.Close(fd); }
        }
    }
}

// ==== 8. Routing trie ============================================================================
// Longest-prefix match from an address to a peer id, one binary trie per family. Outbound packets
// look up their destination; inbound packets look up their source, which must map back to the peer
// whose keys opened the record (cryptokey routing). Nodes are allocated on Insert only; Lookup walks
// at most 32 or 128 nodes and allocates nothing. Empty branches are pruned on Remove.

internal sealed class RouteTrie
{
    private sealed class Node
    {
        internal Node? Zero, One;
        internal int Value = -1;     // peer id, -1 when no prefix ends here
    }

    private readonly Node _v4 = new(), _v6 = new();
    internal int Count { get; private set; }

    internal void Insert(IpPrefix prefix, int peerId)
    {
        Node n = prefix.IsV6 ? _v6 : _v4;
        for (int i = 0; i < prefix.Bits; i++)
            n = prefix.Bit(i) == 0 ? n.Zero ??= new Node() : n.One ??= new Node();
        // Inserting an existing prefix moves it to the new peer: the newest owner wins, the count stays.
        if (n.Value < 0) Count++;
        n.Value = peerId;
    }

    internal bool Remove(IpPrefix prefix)
    {
        bool removed = false;
        RemoveAt(prefix.IsV6 ? _v6 : _v4, prefix, 0, ref removed);
        if (removed) Count--;
        return removed;
    }

    internal int RemoveByPeer(int peerId)
    {
        int removed = RemoveAll(_v4, peerId) + RemoveAll(_v6, peerId);
        Count -= removed;
        return removed;
    }

    /// <summary>The peer id of the longest prefix containing address (4 or 16 bytes), or -1.</summary>
    internal int Lookup(ReadOnlySpan<byte> address)
    {
        // Any other length (a truncated header the caller did not catch) matches nothing rather than throw.
        Node? n = address.Length == 16 ? _v6 : address.Length == 4 ? _v4 : null;
        int best = -1, bits = address.Length * 8;
        for (int i = 0; n != null; i++)
        {
            // The last value seen on the way down is the longest prefix that contains the address.
            if (n.Value >= 0) best = n.Value;
            if (i == bits) break;
            n = ((address[i >> 3] >> (7 - (i & 7))) & 1) == 0 ? n.Zero : n.One;
        }
        return best;
    }

    /// <summary>All (prefix, peer) entries, for status output; allocates.</summary>
    internal List<(IpPrefix Prefix, int PeerId)> Entries()
    {
        var list = new List<(IpPrefix, int)>();
        Span<byte> addr = stackalloc byte[16];
        addr.Clear();
        Collect(_v4, addr, 0, false, list);
        addr.Clear();
        Collect(_v6, addr, 0, true, list);
        return list;
    }

    private static void Collect(Node n, Span<byte> addr, int depth, bool v6, List<(IpPrefix, int)> list)
    {
        if (n.Value >= 0) list.Add((new IpPrefix(addr[..(v6 ? 16 : 4)], depth), n.Value));
        if (n.Zero != null) Collect(n.Zero, addr, depth + 1, v6, list);
        if (n.One != null)
        {
            addr[depth >> 3] |= (byte)(0x80 >> (depth & 7));
            Collect(n.One, addr, depth + 1, v6, list);
            addr[depth >> 3] &= (byte)~(0x80 >> (depth & 7));
        }
    }

    // Returns true when n became empty and can be unlinked by its parent.
    private static bool RemoveAt(Node n, IpPrefix p, int depth, ref bool removed)
    {
        if (depth == p.Bits)
        {
            removed = n.Value >= 0;
            n.Value = -1;
        }
        else if (p.Bit(depth) == 0) { if (n.Zero != null && RemoveAt(n.Zero, p, depth + 1, ref removed)) n.Zero = null; }
        else { if (n.One != null && RemoveAt(n.One, p, depth + 1, ref removed)) n.One = null; }
        return n.Value < 0 && n.Zero == null && n.One == null;
    }

    private static int RemoveAll(Node n, int peerId)
    {
        int removed = 0;
        // A walk over the whole trie: removing a peer is rare (reload, revocation), lookups are not.
        if (n.Value == peerId) { n.Value = -1; removed++; }
        if (n.Zero != null) { removed += RemoveAll(n.Zero, peerId); if (IsEmpty(n.Zero)) n.Zero = null; }
        if (n.One != null) { removed += RemoveAll(n.One, peerId); if (IsEmpty(n.One)) n.One = null; }
        return removed;
    }

    private static bool IsEmpty(Node n) => n.Value < 0 && n.Zero == null && n.One == null;
}

/// <summary>--filter: per-peer rules on the packets that cross the TUN, in the spirit of Nebula's
/// firewall. A rule is "[allow|deny] in|out tcp|udp|icmp|any [PORT[-PORT]] [from|to PATTERN]": in
/// is what peers send us (PORT is ours, the service), out what we send them (PORT is theirs);
/// PATTERN matches peer names, '*' for any run of characters. A direction without rules allows
/// everything; one with rules allows what its first matching rule allows and nothing else. It is
/// stateful: a packet of a flow allowed in one direction (same protocol, addresses and ports, the
/// ICMP echo id standing for ports) passes both ways until the flow is idle for its timeout. The
/// flow table is a fixed array (open addressing, 8 probes, the oldest of them replaced when
/// full): bounded, and nothing is allocated per packet.</summary>
internal sealed class PacketFilter
{
    internal sealed class Rule
    {
        internal string Text = "";
        internal bool Deny, Out;
        internal byte Protocol;                  // 0 any, 6, 17, 1 (ICMP and ICMPv6)
        internal int PortLow, PortHigh = 65535;
        internal string Pattern = "*";
        internal long Hits;
    }

    private record struct Flow(UInt128 Local, UInt128 Remote, int LocalPort, int RemotePort, byte Protocol, int PeerId);

    internal const int FlowSlots = 1 << 14, Probes = 8;
    private const long TcpIdleMs = 600_000, UdpIdleMs = 120_000, IcmpIdleMs = 30_000;
    internal readonly Rule[] Rules;
    private readonly bool _hasIn, _hasOut;
    private readonly Flow[] _flows = new Flow[FlowSlots];
    private readonly long[] _expiresMs = new long[FlowSlots];
    internal long Refused;                       // no rule matched in a direction that has rules

    internal bool Same(List<string> texts)
    {
        if (texts.Count != Rules.Length) return false;
        for (int i = 0; i < Rules.Length; i++) if (Parse(texts[i]).Text != Rules[i].Text) return false;
        return true;
    }

    internal PacketFilter(List<Rule> rules)
    {
        Rules = rules.ToArray();
        foreach (Rule r in Rules) { _hasIn |= !r.Out; _hasOut |= r.Out; }
    }

    internal static Rule Parse(string text)
    {
        string[] w = text.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        var r = new Rule { Text = string.Join(' ', w) };
        int i = 0;
        if (i < w.Length && w[i] is "allow" or "deny") r.Deny = w[i++] == "deny";
        if (i >= w.Length || w[i] is not ("in" or "out")) throw new ConfigException($"filter '{text}': expected in or out (e.g. 'in tcp 22 from admin-*')");
        r.Out = w[i++] == "out";
        if (i >= w.Length) throw new ConfigException($"filter '{text}': expected tcp, udp, icmp or any after {(r.Out ? "out" : "in")}");
        r.Protocol = w[i++] switch { "tcp" => 6, "udp" => 17, "icmp" => 1, "any" => 0, string x => throw new ConfigException($"filter '{text}': '{x}' is not tcp, udp, icmp or any") };
        if (i < w.Length && char.IsAsciiDigit(w[i][0]))
        {
            string[] range = w[i++].Split('-');
            if (range.Length > 2 || !int.TryParse(range[0], out r.PortLow) || !int.TryParse(range[^1], out r.PortHigh) || r.PortLow < 1 || r.PortHigh > 65535 || r.PortLow > r.PortHigh)
                throw new ConfigException($"filter '{text}': a port is 1-65535, a range LOW-HIGH");
            if (r.Protocol is not (6 or 17)) throw new ConfigException($"filter '{text}': ports go with tcp or udp");
        }
        if (i + 1 < w.Length && w[i] is "from" or "to" or "peer")
        {
            r.Pattern = w[i + 1];
            if (!IsPattern(r.Pattern))
                throw new ConfigException($"filter '{text}': a peer pattern is a name with '*' wildcards");
            i += 2;
        }
        if (i != w.Length) throw new ConfigException($"filter '{text}': unexpected '{w[i]}'");
        return r;
    }

    /// <summary>True when the packet may cross; packet is a whole IP packet, peer the one it goes to or came from.</summary>
    internal bool Allow(ReadOnlySpan<byte> packet, Peer peer, bool outbound, long nowMs)
    {
        if (!Read(packet, out UInt128 src, out UInt128 dst, out byte proto, out int sport, out int dport, out int inner)) return !(outbound ? _hasOut : _hasIn);
        var flow = outbound ? new Flow(src, dst, sport, dport, proto, peer.Id) : new Flow(dst, src, dport, sport, proto, peer.Id);
        int home = (int)((uint)flow.GetHashCode() & (FlowSlots - 1));
        if (Find(flow, home, nowMs) is int found) { _expiresMs[found] = nowMs + IdleMs(proto); return true; }
        // An ICMP error (unreachable, packet too big, time exceeded) about a packet of a known flow
        // belongs to that flow: path MTU discovery and traceroute work without a rule of their own.
        // The packet it quotes went the other way: one we sent, if the error comes in.
        // Only one addressed to the quoted packet's sender: a peer cannot aim "errors" elsewhere.
        if (inner > 0 && Read(packet[inner..], out UInt128 qs, out UInt128 qd, out byte qp, out int qsp, out int qdp, out _) && qp != 0 && qs == dst)
        {
            var quoted = outbound ? new Flow(qd, qs, qdp, qsp, qp, peer.Id) : new Flow(qs, qd, qsp, qdp, qp, peer.Id);
            if (Find(quoted, (int)((uint)quoted.GetHashCode() & (FlowSlots - 1)), nowMs) != null) return true;
        }
        if (outbound ? _hasOut : _hasIn)
        {
            Rule? match = null;
            foreach (Rule r in Rules)
                if (r.Out == outbound && (r.Protocol == 0 || r.Protocol == proto) && (r.PortLow == 0 || dport >= r.PortLow && dport <= r.PortHigh) && Glob(r.Pattern, peer.Name))
                { match = r; break; }
            if (match == null) { Refused++; return false; }
            match.Hits++;
            if (match.Deny) return false;
        }
        // A flow matters only to a direction with rules: recording the rest would let one peer's
        // flood push every other peer's flows out of the table.
        if (outbound ? _hasIn : _hasOut) Remember(flow, home, nowMs);
        return true;
    }

    private int? Find(in Flow flow, int home, long nowMs)
    {
        for (int k = 0; k < Probes; k++)
        {
            int at = (home + k) & (FlowSlots - 1);
            if (_expiresMs[at] > nowMs && _flows[at] == flow) return at;
        }
        return null;
    }

    private void Remember(in Flow flow, int home, long nowMs)
    {
        int victim = home;
        for (int k = 0; k < Probes; k++)
        {
            int at = (home + k) & (FlowSlots - 1);
            if (_expiresMs[at] <= nowMs) { victim = at; break; }
            if (_expiresMs[at] < _expiresMs[victim]) victim = at;
        }
        _flows[victim] = flow;
        _expiresMs[victim] = nowMs + IdleMs(flow.Protocol);
    }

    private static long IdleMs(byte proto) => proto == 6 ? TcpIdleMs : proto == 1 ? IcmpIdleMs : UdpIdleMs;

    internal int LiveFlows(long nowMs)
    {
        int n = 0;
        foreach (long e in _expiresMs) if (e > nowMs) n++;
        return n;
    }

    // Addresses as 128-bit numbers (IPv4 in the low 32 bits), the protocol (ICMPv6 as ICMP) and ports:
    // TCP and UDP ports, the id of an ICMP echo for both; 0 where the header is too short. For an
    // ICMP error, inner is where the packet it quotes starts (0: not one).
    private static bool Read(ReadOnlySpan<byte> p, out UInt128 src, out UInt128 dst, out byte proto, out int sport, out int dport, out int inner)
    {
        src = dst = 0; proto = 0; sport = dport = inner = 0;
        bool v6 = false;
        int l4;
        if (p.Length >= Ip.V4HeaderLen && Ip.Version(p) == 4)
        {
            src = BinaryPrimitives.ReadUInt32BigEndian(p[Ip.V4SourceOffset..]);
            dst = BinaryPrimitives.ReadUInt32BigEndian(p[Ip.V4DestinationOffset..]);
            proto = p[Ip.V4ProtocolOffset];
            l4 = (p[0] & 0xF) * 4;
            // A later fragment has no L4 header: it is its own "flow" of ports 0.
            if ((BinaryPrimitives.ReadUInt16BigEndian(p[Ip.V4FragmentOffset..]) & 0x1FFF) != 0) l4 = p.Length;
        }
        else if (p.Length >= Ip.V6HeaderLen && Ip.Version(p) == 6)
        {
            src = BinaryPrimitives.ReadUInt128BigEndian(p[Ip.V6SourceOffset..]);
            dst = BinaryPrimitives.ReadUInt128BigEndian(p[Ip.V6DestinationOffset..]);
            proto = p[Ip.V6NextHeaderOffset];
            l4 = Ip.V6HeaderLen;
            // Past the extension headers to the protocol that rules name: hop-by-hop, routing and
            // destination options (8-byte units), AH (4-byte units), fragment (8 bytes; a later
            // fragment carries no ports). A chain cut short is "no ports" of its last header.
            for (int hops = 0; hops < 8 && proto is 0 or 43 or 60 or 51 or 44 && p.Length >= l4 + 8; hops++)
            {
                byte next = p[l4];
                if (proto == 44)
                {
                    if ((BinaryPrimitives.ReadUInt16BigEndian(p[(l4 + 2)..]) & 0xFFF8) != 0) { proto = next; l4 = p.Length; break; }
                    l4 += 8;
                }
                else l4 += proto == 51 ? (p[l4 + 1] + 2) * 4 : (p[l4 + 1] + 1) * 8;
                proto = next;
            }
            if (proto == 58) proto = 1;
            v6 = true;
        }
        else return false;
        if (proto is 6 or 17 && p.Length >= l4 + 4)
        {
            sport = BinaryPrimitives.ReadUInt16BigEndian(p[l4..]);
            dport = BinaryPrimitives.ReadUInt16BigEndian(p[(l4 + 2)..]);
        }
        else if (proto == 1 && p.Length >= l4 + 6)
        {
            byte type = p[l4];
            // Errors: v4 unreachable 3, time exceeded 11, parameter problem 12; v6 types 1 to 4.
            if (v6 ? type is >= 1 and <= 4 : type is 3 or 11 or 12) { if (p.Length >= l4 + 8 + Ip.V4HeaderLen) inner = l4 + 8; }
            else sport = dport = BinaryPrimitives.ReadUInt16BigEndian(p[(l4 + 4)..]);
        }
        return true;
    }

    /// <summary>A peer name with '*' wildcards (--filter's PATTERN, --exit-for's).</summary>
    internal static bool IsPattern(string s) =>
        s.Length is > 0 and <= 64 && s.AsSpan().IndexOfAnyExcept("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.*") < 0;

    /// <summary>'*' matches any run of characters; no allocation, no backtracking blow-up (one star remembered).</summary>
    internal static bool Glob(string pattern, string name)
    {
        int p = 0, n = 0, star = -1, mark = 0;
        while (n < name.Length)
        {
            if (p < pattern.Length && pattern[p] == '*') { star = p++; mark = n; }
            else if (p < pattern.Length && pattern[p] == name[n]) { p++; n++; }
            else if (star >= 0) { p = star + 1; n = ++mark; }
            else return false;
        }
        while (p < pattern.Length && pattern[p] == '*') p++;
        return p == pattern.Length;
    }
}

// ---- 8.1 Switching: Ethernet frames for --mode tap|hub ----
// With --mode tap the device is a TAP and what travels is whole Ethernet frames. MacTable is the
// learning switch: the source MAC of every authenticated frame from a peer is learned for that peer
// (a MAC seen from another peer moves at once); unicast to a known MAC goes to its peer alone, and
// broadcast, multicast and unknown unicast go to every peer. --mode hub sends every frame to every
// peer. Either way a frame from a peer goes to the TAP only, never on to another peer (split
// horizon): the mesh is full, so nothing needs flooding twice and no loop can form.
// A peer may source only the MACs --allow-mac lists for it, or, without a list, any unicast MAC up to
// MaxPerPeer of them: a flood of made-up sources fills its own share, never the others'.

internal enum L2Mode : byte { Tun, Tap, Hub }

internal static class Ethernet
{
    internal const int HeaderLen = 14, SourceOffset = 6, TypeOffset = 12;
    internal const int MaxHeaderLen = HeaderLen + 4;           // with one 802.1Q tag
    internal const ushort TypeIPv4 = 0x0800, TypeIPv6 = 0x86DD, TypeVlan = 0x8100, TypeQinQ = 0x88A8;

    internal static ulong Mac(ReadOnlySpan<byte> m) => (ulong)BinaryPrimitives.ReadUInt32BigEndian(m) << 16 | BinaryPrimitives.ReadUInt16BigEndian(m[4..]);
    internal static bool IsGroup(ulong mac) => (mac >> 40 & 1) != 0;     // broadcast or multicast

    internal static string MacText(ulong mac)
    {
        Span<char> t = stackalloc char[17];
        for (int i = 0; i < 6; i++)
        {
            byte b = (byte)(mac >> (40 - 8 * i));
            t[3 * i] = "0123456789abcdef"[b >> 4];
            t[3 * i + 1] = "0123456789abcdef"[b & 15];
            if (i < 5) t[3 * i + 2] = ':';
        }
        return new string(t);
    }

    internal static bool TryParseMac(string v, out ulong mac)
    {
        mac = 0;
        if (v.Length != 17) return false;
        for (int i = 0; i < 6; i++)
        {
            if (i < 5 && v[3 * i + 2] is not (':' or '-')) return false;
            if (!byte.TryParse(v.AsSpan(3 * i, 2), System.Globalization.NumberStyles.AllowHexSpecifier, null, out byte b)) return false;
            mac = mac << 8 | b;
        }
        return true;
    }

    /// <summary>Where the IP packet of a frame starts (behind at most one VLAN tag); -1 when it carries none.</summary>
    internal static int IpOffset(ReadOnlySpan<byte> f)
    {
        int at = f.Length >= HeaderLen + 4 && BinaryPrimitives.ReadUInt16BigEndian(f[TypeOffset..]) == TypeVlan ? TypeOffset + 4 : TypeOffset;
        return at + 2 <= f.Length && BinaryPrimitives.ReadUInt16BigEndian(f[at..]) is TypeIPv4 or TypeIPv6 ? at + 2 : -1;
    }

    /// <summary>A rebuilt frame's length (§12.1 zero-extends members): the IP packet's end where the
    /// frame carries one (behind up to two VLAN tags), else all of it (Ethernet tolerates a padded tail).</summary>
    internal static int RebuiltLen(ReadOnlySpan<byte> f)
    {
        int at = TypeOffset;
        for (int tags = 0; tags < 2 && at + 6 <= f.Length && BinaryPrimitives.ReadUInt16BigEndian(f[at..]) is TypeVlan or TypeQinQ; tags++) at += 4;
        if (at + 2 > f.Length || BinaryPrimitives.ReadUInt16BigEndian(f[at..]) is not (TypeIPv4 or TypeIPv6)) return f.Length;
        int ipLen = Node.IpPacketLen(f[(at + 2)..]);
        return ipLen > 0 && at + 2 + ipLen <= f.Length ? at + 2 + ipLen : f.Length;
    }
}

internal enum Learned { Known, New, Moved, Refused }

/// <summary>MAC address -> the peer it was last seen from. Bounded (MaxEntries, MaxPerPeer); an entry
/// idle for IdleMs is as good as gone, and is removed by the next sweep. Allocation-free once the
/// dictionary has its capacity.</summary>
internal sealed class MacTable
{
    internal const int MaxEntries = 4096, MaxPerPeer = 256;
    internal const long IdleMs = 300_000, SweepIntervalMs = 1_000;
    internal struct Entry { internal int PeerId; internal long SeenMs; }
    private readonly Dictionary<ulong, Entry> _entries = new(MaxEntries);
    private int[] _perPeer = new int[16];
    private long _sweepAtMs;
    internal long Moves, Refusals;

    internal int Count => _entries.Count;
    public Dictionary<ulong, Entry>.Enumerator GetEnumerator() => _entries.GetEnumerator();
    internal int CountOf(int peerId) => peerId < _perPeer.Length ? _perPeer[peerId] : 0;

    /// <summary>The live peer id for a MAC, or -1.</summary>
    internal int Lookup(ulong mac, long nowMs)
    {
        ref Entry e = ref CollectionsMarshal.GetValueRefOrNullRef(_entries, mac);
        return Unsafe.IsNullRef(ref e) || nowMs - e.SeenMs >= IdleMs ? -1 : e.PeerId;
    }

    /// <summary>Notes that peerId sent from mac; Refused when its share or the table is full.</summary>
    internal Learned Learn(ulong mac, int peerId, long nowMs)
    {
        if (peerId >= _perPeer.Length) Array.Resize(ref _perPeer, Math.Max(peerId + 1, _perPeer.Length * 2));
        ref Entry e = ref CollectionsMarshal.GetValueRefOrNullRef(_entries, mac);
        if (!Unsafe.IsNullRef(ref e) && e.PeerId == peerId) { e.SeenMs = nowMs; return Learned.Known; }
        if (!Room(peerId, nowMs)) { Refusals++; return Learned.Refused; }
        e = ref CollectionsMarshal.GetValueRefOrNullRef(_entries, mac);     // a sweep may have taken it
        if (Unsafe.IsNullRef(ref e))
        {
            _entries[mac] = new Entry { PeerId = peerId, SeenMs = nowMs };
            _perPeer[peerId]++;
            return Learned.New;
        }
        _perPeer[e.PeerId]--;
        _perPeer[peerId]++;
        e.PeerId = peerId;
        e.SeenMs = nowMs;
        Moves++;
        return Learned.Moved;
    }

    // Room for one more entry of peerId: idle entries are swept (at most once a second) when it is short.
    private bool Room(int peerId, long nowMs)
    {
        bool room = _perPeer[peerId] < MaxPerPeer && _entries.Count < MaxEntries;
        if (room || nowMs < _sweepAtMs) return room;
        _sweepAtMs = nowMs + SweepIntervalMs;
        Remove(-1, nowMs);
        return _perPeer[peerId] < MaxPerPeer && _entries.Count < MaxEntries;
    }

    /// <summary>Removes the entries of peerId (-1: the idle ones of every peer).</summary>
    internal void Remove(int peerId, long nowMs)
    {
        foreach (var (mac, e) in _entries)
            if (peerId < 0 ? nowMs - e.SeenMs >= IdleMs : e.PeerId == peerId)
            {
                _entries.Remove(mac);
                _perPeer[e.PeerId]--;
            }
    }
}

// ==== 9. Peers & timers ==========================================================================
// A Peer is a remote node we hold keys for: its static key, endpoint, allowed prefixes, its three
// session slots, the initiator side of a pending handshake, the responder's memory of its last
// ClientHello, a bounded queue of packets waiting for a session, and its timers. Timers are deadline
// fields in monotonic ms (0 = disarmed), named as in WireGuard's timers.c:
//   RetransmitHandshakeAtMs  no ServerHello yet: send a fresh ClientHello (backoff + jitter), give up
//                            after MaxHandshakeAttempts
//   SendKeepaliveAtMs        we received data but sent nothing for KeepaliveTimeout: send a keepalive
//   NewHandshakeAtMs         we sent data but heard nothing for Keepalive + RekeyTimeout: peer may
//                            have restarted, start a handshake
//   ZeroKeysAtMs             no new session for 3 × RejectAfterTime: erase all keys
//   PersistentKeepaliveAtMs  --keepalive: send something at least this often (NAT bindings)
// The hooks On* are called by the node after the event their name says; the expiry half, Expired*,
// is the part of Node (a partial class) at the end of this section.
// Only the loop thread runs the timers; a timer armed on another worker's thread earlier than the
// loop's next wake-up is reported through LoopSignal, which wakes the loop.

/// <summary>What the loop thread must hear about work done on other workers' threads: a timer armed
/// before the loop's next wake-up, or a change the loop acts on (routes, peers, joiners). Read and
/// written under the node's lock; a worker that finds Pending set wakes the loop (an eventfd).</summary>
internal sealed class LoopSignal
{
    internal long LoopWakeMs = long.MaxValue;    // when the loop runs the timers next
    internal bool Pending;

    internal void Armed(long atMs)
    {
        if (atMs == 0 || atMs >= LoopWakeMs) return;
        LoopWakeMs = atMs;
        Pending = true;
    }

    internal void Poke() => Pending = true;
}

/// <summary>A peer's place in the node. Every peer starts Down; the node's events move it:
///   Down --(a session confirmed: MarkUp)--> Up --(liveness timeout, close, gave up: MarkDown)--> Down
///   Down or Up --(removed: reload, revocation, forgotten, displaced: RemovePeer)--> Removed (final;
///   the slot is reused by a new Peer)
/// Handshaking is not a state of its own: a Down or Up peer with a handshake in flight (Pending).</summary>
internal enum PeerState { Down = 0, Up = 1, Removed = 2 }

/// <summary>Where a peer comes from. Provisional --(its first record confirms it: MarkUp)--> Learned;
/// Learned or Provisional --(named in a reloaded config: Apply)--> Configured. Learned and
/// provisional members are forgotten when silent (ForgetAtMs); configured ones never are.</summary>
internal enum PeerOrigin { Configured = 0, Learned = 1, Provisional = 2 }

internal sealed class Peer
{
    internal readonly int Id;
    internal Key32 PublicKey;
    internal Key32 Psk;
    internal Key32 StaticShared;                 // DH(our static, its static), the ss of every handshake
    internal Endpoint Endpoint;
    internal readonly List<IpPrefix> Allowed;
    internal readonly List<ulong> AllowedMacs;   // --allow-mac (§8.1); empty: any, up to MacTable.MaxPerPeer
    internal string Name;                        // from the config, or the first characters of the key
    internal string ConfiguredEndpoint;          // as configured; Endpoint roams away from it
    internal Endpoint TcpRemote;                 // --peer-tcp (unset: none); Endpoint is a TcpLinks one while in use
    internal Endpoint EndpointBeforeTcp;         // where Endpoint pointed when a TCP link took over
    internal bool Isolated;                      // its config says isolated: it reaches us, no other peer through us
    internal bool OwnPsk;                        // its config gives it a secret of its own (a rotation leaves it)
    internal bool NamedByConfig;                 // its name is our config's, not one it announced
    internal PeerState State { get; private set; }
    internal PeerOrigin Origin { get; private set; }
    internal bool Active => State != PeerState.Removed;
    internal bool Up => State == PeerState.Up;  // a session is confirmed and a record arrived within the liveness time
    internal bool Learned => Origin != PeerOrigin.Configured;
    internal bool Provisional => Origin == PeerOrigin.Provisional;

    // One method per event (the diagrams above PeerState and PeerOrigin).
    internal void OnConfirmed() { Debug.Assert(State == PeerState.Down); State = PeerState.Up; if (Provisional) Origin = PeerOrigin.Learned; }
    internal void OnLost() { Debug.Assert(State == PeerState.Up); State = PeerState.Down; }
    internal void OnRemoved() { Debug.Assert(State != PeerState.Removed); State = PeerState.Removed; }
    internal void OnLearned(bool provisional) => Origin = provisional ? PeerOrigin.Provisional : PeerOrigin.Learned;
    internal void OnConfigured() => Origin = PeerOrigin.Configured;

    // Membership (§15).
    internal bool Reconnecting;                  // the handshake in flight is one reconnect attempt
    internal int ReconnectAttempts;
    internal long CreatedMs, LastSeenMs = -1;    // LastSeenMs: our records or a member's report
    internal bool Remembered;                    // from the state file, not heard from since this start
    internal Session? SelfSentOn, MembersSentOn; // the sessions our last Self and member list went out on
    internal bool SelfHeard;                     // its Self arrived since it came up (DefaultClaims say what it offers)
    internal readonly List<Claim> Claims = new();            // accepted, bounded by MaxClaimsPerMember
    internal readonly List<Claim> DefaultClaims = new();     // its announced 0.0.0.0/0, ::/0: taken if it becomes our exit node
    internal readonly List<Endpoint> Announced = new();      // its own endpoints, as it told us
    internal Endpoint SeesUsAt;                              // where it says our records come from (its Self)
    internal readonly List<Endpoint> Candidates = new();     // where others saw it; tried in turn
    internal int CandidateNext;

    // Its path (§15): straight to Endpoint, or inside Relay records through a member (Node.Heard
    // switches it on each authenticated record; Node.ChoosePath before a handshake).
    internal Peer? Relay;                        // the member that carries our records to it now (null: direct)
    internal Peer? RelayOffer;                   // a member that reported it up and relays for members
    internal long RelayOfferMs = long.MinValue / 2, DownAtMs = long.MinValue / 2;   // that report; when it last went down
    internal long UpAtMs;                        // when it last came up
    internal bool OffersRelay;                   // its own Self says it relays for members
    internal long LastDirectRxMs = long.MinValue / 2;
    internal int PunchAttempts;
    internal bool HelloUnanswered;       // the last hello timed out: the next one takes the other path
    internal long HellosSent;            // ClientHellos to it, on either path
    internal long PunchesSent, PunchesAnswered, LastPunchAnsweredMs = long.MinValue / 2;
    internal long RelayedRxBytes, RelayedTxBytes;            // its records that came or went through a relay
    // Parity (§12.1): the loss it reports of our records (parts per 10,000) and when; our measure of
    // its records (the session measured, its highest counter and records opened when the interval
    // began; smoothed loss; what we last told it); the parity state, made on first use.
    internal int FecReportedBp;
    internal long FecReportedMs = long.MinValue / 2;
    internal Session? LossSession;
    internal ulong LossHighest, LossReceived;
    internal long LossSinceMs;
    internal int LossBp, LossRawBp, LossToldBp;       // smoothed; the last interval's; what we told it
    internal long LossCarry;                          // records an interval got beyond its counters (≤ 0)
    internal FecSender? FecOut;
    internal FecReceiver? FecIn;
    internal string PathName => Relay != null ? "relay:" + Relay.Name : TcpLinks.IsTcp(Endpoint) ? "tcp" : "direct";

    internal Session? Previous, Current, Next;
    internal long RevocationsSentVersion = -1;   // the Mesh.RevocationsVersion this member has heard (§15)
    internal long MembersDigest, MembersSentMs;  // the member list we last told it, and when (0: tell it)
    internal int MembersListed;                  // how many members that list named
    internal long MembersKeysDigest;             // and which (its keys alone)
    internal ulong[] MembersTold = [];           // the members (by Id) our lists named since the last whole one
    internal long MembersSettleAtMs;             // a list that only shrank goes then, if still changed (0: none waits)
    internal bool MembersHeard;                  // it told us a member list since we started (else our Self asks, SelfFresh)
    internal bool ReachesAll;                    // its latest Self: every peer it knows is up (SelfReachesAll)
    internal bool HearsRefusals;                 // and it reads a relay's Refused notice (SelfHearsRefusals; older nodes do not)

    // Initiator side of a handshake in flight, and the hello of the last reconnect attempt, unanswered:
    // its index stays until the next attempt, which sends it again while younger than RekeyTimeoutMs.
    internal Handshake? Pending, Unanswered;
    internal int HandshakeAttempts;
    internal long HandshakeStartedMs;
    internal byte[] LastMac1 = new byte[Spec.MacLen];   // cookie replies are bound to it
    internal byte[] Cookie = new byte[Spec.MacLen];
    internal long CookieReceivedMs = -1;

    // Responder side: replay defence for ClientHello (see Handshake.ConsumeClientHello).
    internal byte[] LastHelloTimestamp = new byte[Spec.TimestampLen];
    internal long LastStaleHelloMs = long.MinValue / 2;
    internal readonly ulong[] RecentHelloIds = new ulong[8];
    internal int RecentHelloNext;
    // The hello answered last (up to MAC2) and its answer: a repeat of that hello gets the answer again.
    internal byte[]? AnsweredHello, Answer;
    internal long AnsweredAtMs;
    internal int AnswerRepeats;

    // Timer deadlines (0: disarmed). Arming one tells the loop (Signal), which may be asleep past it.
    internal LoopSignal? Signal;
    private long _retransmitHandshakeAtMs, _sendKeepaliveAtMs, _newHandshakeAtMs, _zeroKeysAtMs, _persistentKeepaliveAtMs;
    private long _livenessAtMs, _reconnectAtMs, _exchangeAtMs, _claimsExpireAtMs, _punchAtMs, _fecAtMs;
    internal long RetransmitHandshakeAtMs { get => _retransmitHandshakeAtMs; set => Signal?.Armed(_retransmitHandshakeAtMs = value); }
    internal long SendKeepaliveAtMs { get => _sendKeepaliveAtMs; set => Signal?.Armed(_sendKeepaliveAtMs = value); }
    internal long NewHandshakeAtMs { get => _newHandshakeAtMs; set => Signal?.Armed(_newHandshakeAtMs = value); }
    internal long ZeroKeysAtMs { get => _zeroKeysAtMs; set => Signal?.Armed(_zeroKeysAtMs = value); }
    internal long PersistentKeepaliveAtMs { get => _persistentKeepaliveAtMs; set => Signal?.Armed(_persistentKeepaliveAtMs = value); }
    internal long LivenessAtMs { get => _livenessAtMs; set => Signal?.Armed(_livenessAtMs = value); }
    internal long ReconnectAtMs { get => _reconnectAtMs; set => Signal?.Armed(_reconnectAtMs = value); }
    internal long ExchangeAtMs { get => _exchangeAtMs; set => Signal?.Armed(_exchangeAtMs = value); }
    internal long ClaimsExpireAtMs { get => _claimsExpireAtMs; set => Signal?.Armed(_claimsExpireAtMs = value); }
    internal long PunchAtMs { get => _punchAtMs; set => Signal?.Armed(_punchAtMs = value); }
    internal long FecAtMs { get => _fecAtMs; set => Signal?.Armed(_fecAtMs = value); }
    internal long PersistentKeepaliveMs;
    internal long LastHandshakeMs = -1, LastRxMs = -1;
    internal long LastHandshakeUnixS;            // wall clock of the latest handshake, for status (0: never)
    // For status: the round trip of the latest handshake (hello to answer as initiator, answer to the
    // first record as responder; µs, -1: none yet), why the last attempt failed, and roaming.
    internal long HelloSentTicks, RttUs = -1;
    internal string LastFailure = "";            // a reason code (no_answer, gave_up, server_hello_auth, cookie, no_endpoint)
    internal long LastFailureMs = -1;
    internal Endpoint PreviousEndpoint;          // where it was before its latest endpoint change
    internal long EndpointChanges;
    internal long RxBytes, TxBytes, Handshakes;
    internal int FailuresSinceGood;              // bad tags / replays since the last good record
    internal long FirstFailureMs;                // when the first of them arrived
    internal long LastRecoveryMs = long.MinValue / 2;

    // Packets waiting for a session: a ring of FirstStagedSlots that doubles up to MaxStagedPackets
    // and is let go once empty. Allocated whole, the 128 slots were 180 KB of heap held for good by
    // every peer that ever waited for a handshake; the node bounds what all rings hold (MaxStagedBytes).
    private byte[]? _staged;
    private int[]? _stagedLen;
    private int _stagedHead, _stagedCount;
    private readonly int _stagedSlotLen;

    internal Peer(int id, PeerConfig cfg, in Key32 psk, long persistentKeepaliveMs, int mtu)
    {
        Id = id;
        PublicKey = cfg.PublicKey;
        Psk = psk;
        Endpoint = cfg.Endpoint;
        ConfiguredEndpoint = cfg.EndpointText;
        TcpRemote = cfg.Tcp;
        Isolated = cfg.Isolated;
        NamedByConfig = cfg.NameGiven;
        if (OwnPsk = cfg.PskFile.Length > 0) Psk = cfg.Psk;
        Allowed = new List<IpPrefix>(cfg.Allowed);
        AllowedMacs = new List<ulong>(cfg.AllowedMacs);
        Name = cfg.Name.Length > 0 ? cfg.Name : cfg.PublicKey.DefaultName();
        PersistentKeepaliveMs = cfg.KeepaliveMs >= 0 ? cfg.KeepaliveMs : persistentKeepaliveMs;
        _stagedSlotLen = mtu;
    }

    /// <summary>This peer is the one a name or a base64 public key names (--exit-node).</summary>
    internal bool Is(string nameOrKey) => Name == nameOrKey || nameOrKey.Length == 44 && PublicKey.ToBase64() == nameOrKey;

    // --exit-for, as last judged (Node.ExitRefused): for which rule set and which name.
    internal long ExitForVersion = -1;
    internal string? ExitForName;
    internal bool ExitRefusedCached;

    /// <summary>Any of Previous, Current, Next: what --max-sessions counts.</summary>
    internal bool HoldsKeys => Current != null || Next != null || Previous != null;

    internal bool HasReadySession(long nowMs, long rejectAfterMs) =>
        Current != null && nowMs - Current.CreatedMs < rejectAfterMs && Current.SendCounter < Spec.RejectAfterMessages;

    /// <summary>We answered a hello of this peer within RekeyTimeoutMs: its Bind may still come.</summary>
    internal bool Answering(long nowMs) => Next != null && nowMs - Next.CreatedMs < Spec.RekeyTimeoutMs;

    /// <summary>Keeps a copy of packet until a session exists; false if a packet was lost for it:
    /// the oldest made room, or, with the node's rings at their bound (nodeBytes), this one.</summary>
    internal bool Stage(ReadOnlySpan<byte> packet, ref long nodeBytes)
    {
        if (packet.Length > _stagedSlotLen) return false;
        int slots = _stagedLen?.Length ?? 0;
        if (_stagedCount == slots && slots < Tune.MaxStagedPackets)
        {
            int grown = slots == 0 ? Tune.FirstStagedSlots : Math.Min(2 * slots, Tune.MaxStagedPackets);
            long more = (long)(grown - slots) * _stagedSlotLen;
            if (nodeBytes + more <= Tune.MaxStagedBytes)
            {
                GrowStaged(grown);
                nodeBytes += more;
                slots = grown;
            }
            else if (slots == 0) return false;
        }
        bool displaced = false;
        if (_stagedCount == slots)
        {
            _stagedHead = (_stagedHead + 1) % slots;
            _stagedCount--;
            displaced = true;
        }
        int slot = (_stagedHead + _stagedCount) % slots;
        packet.CopyTo(_staged.AsSpan(slot * _stagedSlotLen));
        _stagedLen![slot] = packet.Length;
        _stagedCount++;
        return !displaced;
    }

    // The ring in its new size, oldest packet first.
    private void GrowStaged(int slots)
    {
        var staged = new byte[slots * _stagedSlotLen];
        var lengths = new int[slots];
        for (int i = 0; i < _stagedCount; i++)
        {
            int from = (_stagedHead + i) % _stagedLen!.Length;
            _staged.AsSpan(from * _stagedSlotLen, _stagedLen[from]).CopyTo(staged.AsSpan(i * _stagedSlotLen));
            lengths[i] = _stagedLen[from];
        }
        (_staged, _stagedLen, _stagedHead) = (staged, lengths, 0);
    }

    internal int StagedCount => _stagedCount;

    /// <summary>Bytes this peer's staging ring holds (its slots, used or not).</summary>
    internal int StagedBytes => _staged?.Length ?? 0;

    internal ReadOnlySpan<byte> PeekStaged() =>
        _staged.AsSpan(_stagedHead * _stagedSlotLen, _stagedLen![_stagedHead]);

    internal void PopStaged(ref long nodeBytes)
    {
        _stagedHead = (_stagedHead + 1) % _stagedLen!.Length;
        if (--_stagedCount == 0) ClearStaged(ref nodeBytes);
    }

    internal void ClearStaged(ref long nodeBytes)
    {
        nodeBytes -= StagedBytes;
        _staged = null;
        _stagedLen = null;
        _stagedCount = _stagedHead = 0;
    }

    internal string StateName(long nowMs, long rejectAfterMs) =>
        Up && HasReadySession(nowMs, rejectAfterMs) ? "up" : Pending != null ? "handshaking" : "down";

    /// <summary>No authenticated record for this long: down. Needs keepalives; 0 (none) never expires.</summary>
    internal long LivenessMs => PersistentKeepaliveMs * Tune.LivenessKeepalives;

    /// <summary>When a learned member that is not up is dropped (0: never).</summary>
    internal long ForgetAtMs =>
        !Learned || Up ? 0 : Provisional ? CreatedMs + Tune.ProvisionalLifetimeMs
                                         : Math.Max(CreatedMs, Math.Max(LastSeenMs, LastRxMs)) + Tune.ForgetMemberAfterMs;

    /// <summary>Call after any record was sealed for this peer.</summary>
    internal void OnDataSent(long nowMs, bool carriesData)
    {
        SendKeepaliveAtMs = 0;
        if (carriesData && NewHandshakeAtMs == 0) NewHandshakeAtMs = nowMs + Spec.KeepaliveTimeoutMs + Spec.RekeyTimeoutMs;
        if (PersistentKeepaliveMs > 0) PersistentKeepaliveAtMs = nowMs + PersistentKeepaliveMs;
    }

    /// <summary>Call after a record from this peer authenticated.</summary>
    internal void OnDataReceived(long nowMs, bool carriesData)
    {
        NewHandshakeAtMs = 0;
        LastRxMs = nowMs;
        if (PersistentKeepaliveMs > 0) LivenessAtMs = nowMs + LivenessMs;
        FailuresSinceGood = 0;
        if (carriesData && SendKeepaliveAtMs == 0) SendKeepaliveAtMs = nowMs + Spec.KeepaliveTimeoutMs;
        // Receiving does not postpone our persistent keepalive: each side must hear from the other
        // every period, or two peers' timers would silence one of them and liveness would fail.
    }

    /// <summary>Call after a session was derived (either role).</summary>
    internal void OnSessionDerived(long nowMs, long unixNs)
    {
        ZeroKeysAtMs = nowMs + 3 * Spec.RejectAfterTimeMs;
        LastHandshakeMs = nowMs;
        LastHandshakeUnixS = unixNs / 1_000_000_000;
        Handshakes++;
    }

    internal void OnFailure(string reason, long nowMs) { LastFailure = reason; LastFailureMs = nowMs; }

    /// <summary>Call after our ClientHello was answered.</summary>
    internal Handshake? AwaitingAnswer(uint localIndex) =>
        Pending?.LocalIndex == localIndex ? Pending : Unanswered?.LocalIndex == localIndex ? Unanswered : null;

    internal void OnHandshakeComplete()
    {
        Pending?.Clear();
        Pending = null;
        Reconnecting = false;
        RetransmitHandshakeAtMs = 0;
        HandshakeAttempts = 0;
    }

    /// <summary>A random 0..max ms added to retransmits and reconnects so peers do not move in step;
    /// the node's (Node.Jitter), so tests can fix it and check exact deadlines.</summary>
    internal Func<long, long> Jitter = max => Random.Shared.NextInt64(max + 1);

    /// <summary>Delay before reconnect attempt n of a member that is down: 1 s doubling to 120 s, plus up to a quarter.</summary>
    internal long ReconnectDelayMs(int attempt)
    {
        long d = Math.Min(Tune.FirstReconnectMs << Math.Min(attempt, 8), Tune.MaxReconnectMs);
        return d + Jitter(d / 4);
    }

    /// <summary>Call after a reconnect attempt failed (or a peer left): arms the next, later one.</summary>
    internal void OnReconnectFailed(long nowMs) => ReconnectAtMs = nowMs + ReconnectDelayMs(ReconnectAttempts++);

    /// <summary>Delay before punch round n over a relayed session: 2 s doubling to MaxPunchIntervalMs, plus up to a quarter.</summary>
    internal long PunchDelayMs(int attempt)
    {
        long d = Math.Min(2_000L << Math.Min(attempt, 8), Tune.MaxPunchIntervalMs);
        return d + Jitter(d / 4);
    }

    /// <summary>Retransmit delay: doubling from FirstRetransmitMs up to RekeyTimeoutMs, plus jitter.</summary>
    internal long RetransmitDelayMs(int attempt)
    {
        long d = Spec.FirstRetransmitMs << Math.Min(attempt, 8);
        return Math.Min(d, Spec.RekeyTimeoutMs) + Jitter(Spec.RekeyTimeoutJitterMaxMs);
    }
}

/// <summary>The node's timers, the expiry half (the On* hooks are Peer's, above): only the loop's thread runs them.</summary>
internal sealed partial class Node
{
    /// <summary>Runs every expired timer; returns the next deadline (ms), or long.MaxValue.</summary>
    internal long ProcessTimers(long nowMs)
    {
        long next = long.MaxValue;
        bool forgot = false, anyUp = false;
        foreach (Peer p in Peers) anyUp |= p.Active && p.Up;
        foreach (Peer p in Peers)
        {
            if (!p.Active) continue;
            if (p.RetransmitHandshakeAtMs != 0 && nowMs >= p.RetransmitHandshakeAtMs) ExpiredRetransmitHandshake(p, nowMs);
            if (p.SendKeepaliveAtMs != 0 && nowMs >= p.SendKeepaliveAtMs) ExpiredSendKeepalive(p, nowMs);
            if (p.NewHandshakeAtMs != 0 && nowMs >= p.NewHandshakeAtMs) ExpiredNewHandshake(p, nowMs);
            if (p.ZeroKeysAtMs != 0 && nowMs >= p.ZeroKeysAtMs) ExpiredZeroKeys(p, nowMs);
            if (p.PersistentKeepaliveAtMs != 0 && nowMs >= p.PersistentKeepaliveAtMs) ExpiredPersistentKeepalive(p, nowMs);
            if (p.LivenessAtMs != 0 && nowMs >= p.LivenessAtMs) ExpiredLiveness(p, nowMs);
            if (p.ReconnectAtMs != 0 && nowMs >= p.ReconnectAtMs) ExpiredReconnect(p, nowMs);
            if (p.ExchangeAtMs != 0 && nowMs >= p.ExchangeAtMs) ExpiredExchange(p, nowMs);
            if (p.ClaimsExpireAtMs != 0 && nowMs >= p.ClaimsExpireAtMs) ExpiredClaims(p);
            if (p.PunchAtMs != 0 && nowMs >= p.PunchAtMs) ExpiredPunch(p, nowMs);
            if (p.FecAtMs != 0 && nowMs >= p.FecAtMs) ExpiredFec(p, nowMs);
            long forgetAtMs = p.Remembered && !anyUp ? 0 : p.ForgetAtMs;   // alone: the state file is all we know
            if (forgetAtMs != 0 && nowMs >= forgetAtMs)
            {
                if (!p.Provisional) Mesh.MembersForgotten++;
                RemovePeer(p, "silent");
                forgot = true;
                continue;
            }
            foreach (long t in (ReadOnlySpan<long>)[p.RetransmitHandshakeAtMs, p.SendKeepaliveAtMs, p.NewHandshakeAtMs, p.ZeroKeysAtMs,
                                                    p.PersistentKeepaliveAtMs, p.LivenessAtMs, p.ReconnectAtMs, p.ExchangeAtMs, p.ClaimsExpireAtMs, p.PunchAtMs, p.FecAtMs, forgetAtMs])
                if (t != 0 && t < next) next = t;
        }
        if (forgot) RebuildRoutes();
        return next;
    }

    private void ExpiredRetransmitHandshake(Peer p, long nowMs)
    {
        p.HelloUnanswered = true;                        // the next hello takes the other path (ChoosePath)
        p.OnFailure("no_answer", nowMs);
        // A reconnect attempt is one ClientHello: unanswered, the next waits longer (ExpiredReconnect).
        // The hello stays (Unanswered), so a late answer still completes it.
        if (p.Reconnecting && p.StagedCount == 0)
        {
            ForgetUnanswered(p);
            (p.Unanswered, p.Pending) = (p.Pending, null);
            p.OnHandshakeComplete();
            p.OnReconnectFailed(nowMs);
            Log.Debug("reconnect_failed", $"peer={p.Name} attempt={p.ReconnectAttempts} next_in_ms={p.ReconnectAtMs - nowMs}");
            return;
        }
        if (p.HandshakeAttempts >= Spec.MaxHandshakeAttempts || nowMs - p.HandshakeStartedMs >= Spec.RekeyAttemptTimeMs)
        {
            Log.Warn("handshake_gave_up", $"peer={p.Name} attempts={p.HandshakeAttempts} endpoint={p.Endpoint} rule=max_attempts staged_dropped={p.StagedCount}");
            p.OnFailure("gave_up", nowMs);
            EndHandshake(p);
            p.ClearStaged(ref StagedBytes);
            MarkDown(p, nowMs, "handshake_gave_up");
            p.OnReconnectFailed(nowMs);                  // keep trying, ever more slowly
            return;
        }
        Log.Debug("handshake_retransmit", $"peer={p.Name} attempt={p.HandshakeAttempts + 1} rule=retransmit_handshake");
        NextCandidate(p);
        StartHandshake(p, nowMs, retransmit: true);
    }

    // A member that is not up is tried at each endpoint others reported for it, in turn.
    private static void NextCandidate(Peer p)
    {
        if (p.Up || p.Candidates.Count < 2) return;
        p.CandidateNext = (p.CandidateNext + 1) % p.Candidates.Count;
        p.Endpoint = p.Candidates[p.CandidateNext];
    }

    private void ExpiredLiveness(Peer p, long nowMs)
    {
        MarkDown(p, nowMs, $"silent_{p.LivenessMs / 1000}s");
        p.ReconnectAttempts = 0;
        p.ReconnectAtMs = nowMs;
    }

    private void ExpiredReconnect(Peer p, long nowMs)
    {
        p.ReconnectAtMs = 0;
        if (p.Up && p.HasReadySession(nowMs, Spec.RejectAfterTimeMs)) return;
        if (p.Pending != null) return;                     // a handshake is already running; its timers decide
        if (p.Answering(nowMs))
        {
            p.ReconnectAtMs = p.Next!.CreatedMs + Spec.RekeyTimeoutMs;   // its Bind is on the way
            return;
        }
        NextCandidate(p);
        StartHandshake(p, nowMs, retransmit: false);
        p.Reconnecting = p.Pending != null;
    }

    private void ExpiredExchange(Peer p, long nowMs)
    {
        p.ExchangeAtMs = 0;
        if (p.Up) Mesh.SendTo(p, nowMs);
    }

    private void ExpiredPunch(Peer p, long nowMs)
    {
        p.PunchAtMs = 0;
        Punch(p, nowMs);
    }

    private void ExpiredClaims(Peer p)
    {
        p.ClaimsExpireAtMs = 0;
        if (p.Claims.Count == 0) return;
        Log.Info("claims_expired", $"peer={p.Name} claims={p.Claims.Count}");
        p.Claims.Clear();
        RebuildRoutes();
    }

    private void ExpiredSendKeepalive(Peer p, long nowMs)
    {
        p.SendKeepaliveAtMs = 0;
        if (CanSend(p, nowMs)) SendEmpty(p, nowMs, RecordFlags.Keepalive);
    }

    private void ExpiredNewHandshake(Peer p, long nowMs)
    {
        p.NewHandshakeAtMs = 0;
        Log.Info("handshake_start", $"peer={p.Name} rule=new_handshake hint=\"sent data but heard nothing for {(Spec.KeepaliveTimeoutMs + Spec.RekeyTimeoutMs) / 1000} s\"");
        StartHandshake(p, nowMs, retransmit: false);
    }

    private void ExpiredZeroKeys(Peer p, long nowMs)
    {
        p.ZeroKeysAtMs = 0;
        Log.Debug("keys_zeroed", $"peer={p.Name} rule=zero_keys");
        DropSessions(p);
        MarkDown(p, nowMs, "keys_expired");
    }

    private void ExpiredPersistentKeepalive(Peer p, long nowMs)
    {
        p.PersistentKeepaliveAtMs = nowMs + p.PersistentKeepaliveMs;
        // A peer that is down is tried on the reconnect schedule only: keepalives on its old session
        // would start rekeys, and handshakes every period, at a gone peer.
        if (!p.Up) return;
        if (CanSend(p, nowMs)) SendEmpty(p, nowMs, RecordFlags.Keepalive);
        else StartHandshake(p, nowMs, retransmit: false);
    }
}

// ==== 10. Handshake & cookies ====================================================================
// Noise_IKpsk2_25519_ChaChaPoly_SHA256 (Noise rev 34, §7.5 IK with psk2), prologue "veil/1":
//   <- s
//   ...
//   -> e, es, s, ss          ClientHello, payload {t}: TAI64N timestamp + AEAD capabilities
//   <- e, ee, se, psk        ServerHello, payload: chosen AEAD, padding block, keepalive
// Split() gives the initiator->responder and responder->initiator keys; a third HKDF output gives the
// two header-mask keys of the record layer. The network secret is the psk (32 zero bytes if none).
//
// Around each message: the TLS handshake preamble, a type byte and session indexes, then MAC1 =
// HMAC-SHA256(SHA-256("mac1----" ‖ responder static), message)[0..16), which lets the receiver drop
// anything not addressed to its key before any Diffie-Hellman; MAC2 is the same over the message and
// MAC1 keyed by a cookie. Under load a ClientHello without a valid MAC2 gets a CookieReply instead of
// an answer: cookie = HMAC(secret rotated every 2 min, source address ‖ port)[0..16), sent encrypted
// under SHA-256("cookie--" ‖ responder static) with the hello's MAC1 as associated data.
//
// Replayed ClientHellos: a hello is fresh when its timestamp is newer than the last one from that
// peer. A router without a clock may reboot into the past, so an older timestamp is not refused
// outright, but it is answered only when that peer has been silent (no authenticated record for
// Keepalive + RekeyTimeout: a rebooting router is), no handshake of its is being completed (a Next
// younger than RekeyTimeout), at most once per StaleHelloIntervalMs, and never when its ephemeral
// key was seen among the last hellos. So a replay, however old, cannot displace a genuine session,
// and even when answered it gains nothing: a hello moves no endpoint (only authenticated records
// do, §14.2), and its Next session needs a Bind that only the real initiator can produce.
//
// Retransmits: within RekeyTimeout of its first copy a hello is sent again unchanged (but for MAC2),
// and the responder sends the ServerHello it made for it again, from a copy, while that session waits
// for its Bind. A busy responder (a hundred members starting at once) would otherwise answer every
// copy with new Diffie-Hellman work, each answer replacing the last, while its initiator had already
// moved on to the next copy's index; now the first answer that arrives completes the handshake.

internal static class Wire
{
    internal const byte TypeClientHello = 1, TypeServerHello = 2, TypeCookieReply = 3;

    internal const int TypeOffset = 5;
    internal const int ClientHelloSenderOffset = 6;
    internal const int ClientHelloEphemeralOffset = 10;
    internal const int ClientHelloNoiseLen = 32 + (32 + Spec.TagLen) + (ClientHelloPayloadLen + Spec.TagLen);
    internal const int ClientHelloPayloadLen = Spec.TimestampLen + 4;                // {t} + aead mask, preferred, 2 reserved
    internal const int ClientHelloMac1Offset = ClientHelloEphemeralOffset + ClientHelloNoiseLen;
    internal const int ClientHelloMac2Offset = ClientHelloMac1Offset + Spec.MacLen;
    internal const int ClientHelloLen = ClientHelloMac2Offset + Spec.MacLen;          // 154

    internal const int ServerHelloSenderOffset = 6;
    internal const int ServerHelloReceiverOffset = 10;
    internal const int ServerHelloEphemeralOffset = 14;
    internal const int ServerHelloPayloadLen = 8;                                     // aead, pad block, keepalive s (u16), 4 reserved
    internal const int ServerHelloNoiseLen = 32 + ServerHelloPayloadLen + Spec.TagLen;
    internal const int ServerHelloMac1Offset = ServerHelloEphemeralOffset + ServerHelloNoiseLen;
    internal const int ServerHelloMac2Offset = ServerHelloMac1Offset + Spec.MacLen;
    internal const int ServerHelloLen = ServerHelloMac2Offset + Spec.MacLen;          // 102

    internal const int CookieReplyReceiverOffset = 6;
    internal const int CookieReplyNonceOffset = 10;
    internal const int CookieReplyCookieOffset = 22;
    internal const int CookieReplyLen = CookieReplyCookieOffset + Spec.MacLen + Spec.TagLen;   // 54

    internal static void WritePreamble(Span<byte> msg, byte contentType, int totalLen)
    {
        msg[0] = contentType; msg[1] = 0x03; msg[2] = 0x03;
        BinaryPrimitives.WriteUInt16BigEndian(msg[3..], (ushort)(totalLen - Spec.PreambleLen));
    }

    /// <summary>TAI64N label: 2^62 + seconds, then nanoseconds, both big-endian.</summary>
    internal static void WriteTai64n(Span<byte> dst, long unixNs)
    {
        BinaryPrimitives.WriteUInt64BigEndian(dst, 0x4000000000000000UL + (ulong)(unixNs / 1_000_000_000));
        BinaryPrimitives.WriteUInt32BigEndian(dst[8..], (uint)(unixNs % 1_000_000_000));
    }
}

/// <summary>Noise symmetric state: chaining key, hash, cipher key and nonce (Noise §5.1–5.2).</summary>
internal sealed class NoiseState
{
    internal Key32 Ck, H, K;
    internal ulong N;

    internal void Initialize(ReadOnlySpan<byte> protocolName, ReadOnlySpan<byte> prologue, ReadOnlySpan<byte> responderStatic)
    {
        if (protocolName.Length <= 32) { H.Clear(); protocolName.CopyTo(H); }
        else SHA256.HashData(protocolName, H);
        Ck = H;
        K.Clear();
        N = 0;
        MixHash(prologue);
        MixHash(responderStatic);     // <- s
    }

    internal void MixHash(ReadOnlySpan<byte> data)
    {
        using var sha = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        sha.AppendData(H);
        sha.AppendData(data);
        sha.GetHashAndReset(H);
    }

    internal void MixKey(ReadOnlySpan<byte> ikm)
    {
        Hkdf.Noise(Ck, ikm, Ck, K, default);
        N = 0;
    }

    internal void MixKeyAndHash(ReadOnlySpan<byte> ikm)
    {
        Span<byte> tempH = stackalloc byte[32];
        Hkdf.Noise(Ck, ikm, Ck, tempH, K);
        MixHash(tempH);
        N = 0;
    }

    internal void EncryptAndHash(ReadOnlySpan<byte> plaintext, Span<byte> dst)
    {
        Span<byte> nonce = stackalloc byte[Spec.NonceLen];
        Nonce(nonce, N++);
        using (var c = new ChaCha20Poly1305(K))
            c.Encrypt(nonce, plaintext, dst[..plaintext.Length], dst.Slice(plaintext.Length, Spec.TagLen), H);
        MixHash(dst[..(plaintext.Length + Spec.TagLen)]);
    }

    internal bool DecryptAndHash(ReadOnlySpan<byte> ciphertext, Span<byte> plaintext)
    {
        Span<byte> nonce = stackalloc byte[Spec.NonceLen];
        Nonce(nonce, N++);
        int n = ciphertext.Length - Spec.TagLen;
        using (var c = new Aead(AeadKind.ChaCha20Poly1305, K))
            if (!c.Open(nonce, ciphertext, H, plaintext)) return false;
        MixHash(ciphertext);
        return n >= 0;
    }

    /// <summary>Split(): initiator->responder key, responder->initiator key, and 32 bytes for header masks.</summary>
    internal void Split(Span<byte> k1, Span<byte> k2, Span<byte> extra) => Hkdf.Noise(Ck, default, k1, k2, extra);

    /// <summary>ChaChaPoly nonce (Noise §12.3): 32 zero bits then the 64-bit counter little-endian.</summary>
    internal static void Nonce(Span<byte> nonce12, ulong n)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(nonce12, 0);
        BinaryPrimitives.WriteUInt64LittleEndian(nonce12[4..], n);
    }

    internal void Clear()
    {
        Ck.Clear(); H.Clear(); K.Clear();
    }

    // -> e, es, s, ss, payload. ss is precomputed DH(s, rs). Returns false on a low-order key.
    internal bool WriteMessage1(ReadOnlySpan<byte> ePriv, ReadOnlySpan<byte> sPub, ReadOnlySpan<byte> rs, ReadOnlySpan<byte> ss, ReadOnlySpan<byte> payload, Span<byte> dst)
    {
        Span<byte> dh = stackalloc byte[32];
        try
        {
            X25519.PublicKey(dst[..32], ePriv);                     // e
            MixHash(dst[..32]);
            MixKey(dst[..32]);                                      // psk handshakes mix e into the key too
            if (!X25519.Dh(dh, ePriv, rs)) return false;            // es
            MixKey(dh);
            EncryptAndHash(sPub, dst.Slice(32, 48));                // s
            MixKey(ss);                                             // ss
            EncryptAndHash(payload, dst[80..]);                     // payload
            return true;
        }
        finally { CryptographicOperations.ZeroMemory(dh); }
    }

    // <- e, es, s: reads up to the initiator's static key so the caller can look up the peer.
    internal bool ReadMessage1Static(ReadOnlySpan<byte> sPriv, ReadOnlySpan<byte> src, Span<byte> remoteEphemeral, Span<byte> remoteStatic)
    {
        Span<byte> dh = stackalloc byte[32];
        try
        {
            src[..32].CopyTo(remoteEphemeral);                      // e
            MixHash(remoteEphemeral);
            MixKey(remoteEphemeral);
            if (!X25519.Dh(dh, sPriv, remoteEphemeral)) return false;   // es
            MixKey(dh);
            return DecryptAndHash(src.Slice(32, 48), remoteStatic); // s
        }
        finally { CryptographicOperations.ZeroMemory(dh); }
    }

    // ss, payload: the rest of message 1.
    internal bool ReadMessage1Payload(ReadOnlySpan<byte> ss, ReadOnlySpan<byte> src, Span<byte> payload)
    {
        MixKey(ss);
        return DecryptAndHash(src[80..], payload);
    }

    // <- e, ee, se, psk, payload (responder). re/rs: the initiator's ephemeral and static keys.
    internal bool WriteMessage2(ReadOnlySpan<byte> ePriv, ReadOnlySpan<byte> re, ReadOnlySpan<byte> rs, ReadOnlySpan<byte> psk, ReadOnlySpan<byte> payload, Span<byte> dst)
    {
        Span<byte> dh = stackalloc byte[32];
        try
        {
            X25519.PublicKey(dst[..32], ePriv);                     // e
            MixHash(dst[..32]);
            MixKey(dst[..32]);
            if (!X25519.Dh(dh, ePriv, re)) return false;            // ee
            MixKey(dh);
            if (!X25519.Dh(dh, ePriv, rs)) return false;            // se
            MixKey(dh);
            MixKeyAndHash(psk);                                     // psk
            EncryptAndHash(payload, dst[32..]);
            return true;
        }
        finally { CryptographicOperations.ZeroMemory(dh); }
    }

    // -> reads message 2 (initiator): e, ee, se, psk, payload.
    internal bool ReadMessage2(ReadOnlySpan<byte> ePriv, ReadOnlySpan<byte> sPriv, ReadOnlySpan<byte> psk, ReadOnlySpan<byte> src, Span<byte> payload)
    {
        Span<byte> dh = stackalloc byte[32];
        try
        {
            ReadOnlySpan<byte> re = src[..32];                      // e
            MixHash(re);
            MixKey(re);
            if (!X25519.Dh(dh, ePriv, re)) return false;            // ee
            MixKey(dh);
            if (!X25519.Dh(dh, sPriv, re)) return false;            // se
            MixKey(dh);
            MixKeyAndHash(psk);                                     // psk
            return DecryptAndHash(src[32..], payload);
        }
        finally { CryptographicOperations.ZeroMemory(dh); }
    }
}

/// <summary>The initiator's state between sending a ClientHello and consuming the ServerHello.</summary>
internal sealed class Handshake
{
    internal readonly NoiseState Noise = new();
    internal Key32 EphemeralPrivate;
    internal uint LocalIndex;
    internal long CreatedMs;
    internal readonly byte[] Hello = new byte[Wire.ClientHelloLen];   // retransmits within RekeyTimeoutMs send it again

    internal void Clear()
    {
        Noise.Clear();
        EphemeralPrivate.Clear();
    }
}

/// <summary>Keys from a completed handshake, ready to become a Session.</summary>
internal sealed class SessionKeys
{
    internal Key32 Send, Receive;
    internal ulong SendMaskKey, ReceiveMaskKey;
    internal uint LocalIndex, RemoteIndex;
    internal bool IsInitiator;
    internal AeadKind Aead;

    internal void Clear() { Send.Clear(); Receive.Clear(); SendMaskKey = ReceiveMaskKey = 0; }

    internal static SessionKeys FromSplit(NoiseState st, bool initiator, uint localIndex, uint remoteIndex, AeadKind aead)
    {
        Span<byte> k1 = stackalloc byte[32], k2 = stackalloc byte[32], extra = stackalloc byte[32];
        st.Split(k1, k2, extra);
        var keys = new SessionKeys { LocalIndex = localIndex, RemoteIndex = remoteIndex, IsInitiator = initiator, Aead = aead };
        ulong m1 = BinaryPrimitives.ReadUInt64LittleEndian(extra), m2 = BinaryPrimitives.ReadUInt64LittleEndian(extra[8..]);
        (initiator ? k1 : k2).CopyTo(keys.Send);
        (initiator ? k2 : k1).CopyTo(keys.Receive);
        keys.SendMaskKey = initiator ? m1 : m2;
        keys.ReceiveMaskKey = initiator ? m2 : m1;
        CryptographicOperations.ZeroMemory(k1);
        CryptographicOperations.ZeroMemory(k2);
        CryptographicOperations.ZeroMemory(extra);
        st.Clear();
        return keys;
    }
}

internal enum HandshakeVerdict { Ok, Malformed, BadMac1, NeedCookie, BadMac2, Failed, UnknownPeer, StaleHello, UnknownIndex, RateLimited }

/// <summary>The result of consuming a ClientHello: everything needed to answer it.</summary>
internal sealed class HelloState
{
    internal readonly NoiseState Noise = new();
    internal Key32 RemoteEphemeral;
    internal uint RemoteIndex;
    internal byte AeadMask, PreferredAead;
    internal Peer? Peer;
    internal byte[] Timestamp = new byte[Spec.TimestampLen];
}

/// <summary>This node's identity and the stateless parts of the handshake: MACs, cookies, load.</summary>
internal sealed class Handshaker
{
    private static readonly byte[] ProtocolName = Encoding.ASCII.GetBytes(Spec.NoiseProtocolName);
    private static readonly byte[] PrologueBytes = Encoding.ASCII.GetBytes(Spec.Prologue);

    internal Key32 PrivateKey, PublicKey;
    private Key32 _mac1Key, _cookieKey;           // keyed by our public key: others use these to reach us
    private Key32 _cookieSecret;
    private long _cookieSecretAtMs = long.MinValue / 2;
    // Under a flood every hello costs these: keyed contexts kept across calls cost half a one-shot HMAC.
    private IncrementalHash? _mac1Hmac, _cookieHmac;
    private Aead? _cookieAead;
    private readonly byte[] _cookieNonce = RandomNumberGenerator.GetBytes(12);   // counts up from a random start
    internal byte AeadMask;                       // bit (1 << AeadKind) per AEAD we can run
    internal AeadKind PreferredAead;
    private readonly Func<Key32, Peer?> _findPeer;
    internal Key32[] AcceptPsks = [];             // network secrets also accepted in a ServerHello (a rotation)

    internal Handshaker(in Key32 privateKey, Func<Key32, Peer?> findPeer)
    {
        PrivateKey = privateKey;
        X25519.PublicKey(PublicKey, PrivateKey);
        MacKey("mac1----", PublicKey, ref _mac1Key);
        MacKey("cookie--", PublicKey, ref _cookieKey);
        _findPeer = findPeer;
        foreach (AeadKind k in new[] { AeadKind.ChaCha20Poly1305, AeadKind.Aes256Gcm })
            if (Aead.IsSupported(k)) AeadMask |= (byte)(1 << (int)k);
        PreferredAead = AeadKind.ChaCha20Poly1305;
    }

    /// <summary>--cipher: "auto" prefers whichever AEAD seals a full record and a short one faster on
    /// this CPU (the initiator's preference wins when both ends support it); a named cipher is the only one offered.
    /// timeRound stands in for the measurement in tests.</summary>
    internal void ChooseCipher(string cipher, Func<AeadKind, double>? timeRound = null)
    {
        if (cipher == "auto")
        {
            PreferredAead = AeadKind.ChaCha20Poly1305;
            if (!Aead.IsSupported(AeadKind.Aes256Gcm)) return;
            if (!Aead.IsSupported(AeadKind.ChaCha20Poly1305)) { PreferredAead = AeadKind.Aes256Gcm; return; }
            if (timeRound != null) { PreferredAead = FasterAead(timeRound); return; }
            using var clock = new SealClock();
            PreferredAead = FasterAead(clock.Round);
            return;
        }
        PreferredAead = cipher == "aes-256-gcm" ? AeadKind.Aes256Gcm : AeadKind.ChaCha20Poly1305;
        AeadMask = (byte)(1 << (int)PreferredAead);
    }

    internal const int CipherRounds = 8;

    // Short rounds of the two AEADs alternate and the best round of each counts: a CPU kept busy
    // at start-up (other daemons starting at boot) slows a stretch of consecutive rounds, and
    // alternating spreads that stretch over both instead of deciding for one of them.
    internal static AeadKind FasterAead(Func<AeadKind, double> timeRound)
    {
        double chacha = double.MaxValue, gcm = double.MaxValue;
        for (int round = 0; round < CipherRounds; round++)
        {
            chacha = Math.Min(chacha, timeRound(AeadKind.ChaCha20Poly1305));
            gcm = Math.Min(gcm, timeRound(AeadKind.Aes256Gcm));
        }
        return gcm < chacha ? AeadKind.Aes256Gcm : AeadKind.ChaCha20Poly1305;
    }

    /// <summary>Times rounds of seals with a throwaway key, per AEAD (µs per pair of records). A pair
    /// is a full record and a short one (an ACK, a ping, a DNS query): full records alone made it a
    /// coin toss on a CPU with AES-NI and AVX-512 (0.96 µs each), where ChaCha20-Poly1305 through
    /// EVP then cost four times as much per short record as Veil's own AES-GCM (AesGcmNi).</summary>
    internal sealed class SealClock : IDisposable
    {
        private const int SealsPerRound = 32, RecordLen = 1420, ShortRecordLen = 64;
        private readonly Aead _chacha, _gcm;
        private readonly byte[] _buf = new byte[RecordLen + Spec.TagLen], _nonce = new byte[Spec.NonceLen], _aad = new byte[Record.HeaderLen];

        internal SealClock()
        {
            Span<byte> key = stackalloc byte[32];
            RandomNumberGenerator.Fill(key);
            _chacha = new Aead(AeadKind.ChaCha20Poly1305, key);
            _gcm = new Aead(AeadKind.Aes256Gcm, key);
            CryptographicOperations.ZeroMemory(key);
        }

        internal double Round(AeadKind kind)
        {
            Aead aead = kind == AeadKind.Aes256Gcm ? _gcm : _chacha;
            long t0 = Stopwatch.GetTimestamp();
            for (int i = 0; i < SealsPerRound; i++)
            {
                aead.Seal(_nonce, _buf.AsSpan(0, RecordLen), _aad, _buf);
                aead.Seal(_nonce, _buf.AsSpan(0, ShortRecordLen), _aad, _buf);
            }
            return Stopwatch.GetElapsedTime(t0).TotalMicroseconds / SealsPerRound;
        }

        public void Dispose()
        {
            _chacha.Dispose();
            _gcm.Dispose();
        }
    }

    internal static void MacKey(string label, ReadOnlySpan<byte> publicKey, ref Key32 key)
    {
        Span<byte> buf = stackalloc byte[8 + 32];
        Encoding.ASCII.GetBytes(label, buf);
        publicKey.CopyTo(buf[8..]);
        SHA256.HashData(buf, key);
    }

    private static void Mac(ReadOnlySpan<byte> key, ReadOnlySpan<byte> data, Span<byte> mac16)
    {
        Span<byte> full = stackalloc byte[32];
        HMACSHA256.HashData(key, data, full);
        full[..Spec.MacLen].CopyTo(mac16);
    }

    private static void Mac(IncrementalHash keyed, ReadOnlySpan<byte> data, Span<byte> mac16)
    {
        Span<byte> full = stackalloc byte[32];
        keyed.AppendData(data);
        keyed.GetHashAndReset(full);
        full[..Spec.MacLen].CopyTo(mac16);
    }

    private static bool MacMatches(ReadOnlySpan<byte> key, ReadOnlySpan<byte> data, ReadOnlySpan<byte> mac16)
    {
        Span<byte> expect = stackalloc byte[Spec.MacLen];
        Mac(key, data, expect);
        return CryptographicOperations.FixedTimeEquals(expect, mac16);
    }

    // MAC1 keyed by the receiver's public key; MAC2 by a cookie from the receiver, if we hold a fresh one.
    private static void WriteMacs(Span<byte> msg, int mac1Offset, ReadOnlySpan<byte> receiverPublic, Peer p, long nowMs)
    {
        Key32 key = default;
        MacKey("mac1----", receiverPublic, ref key);
        Mac(key, msg[..mac1Offset], msg.Slice(mac1Offset, Spec.MacLen));
        msg.Slice(mac1Offset, Spec.MacLen).CopyTo(p.LastMac1);
        Span<byte> mac2 = msg.Slice(mac1Offset + Spec.MacLen, Spec.MacLen);
        if (p.CookieReceivedMs >= 0 && nowMs - p.CookieReceivedMs < Spec.CookieRefreshTimeMs)
            Mac(p.Cookie, msg[..(mac1Offset + Spec.MacLen)], mac2);
        else mac2.Clear();
    }

    /// <summary>-> e, es, s, ss, {t}: writes a ClientHello for p and leaves p.Pending set.</summary>
    internal int CreateClientHello(Peer p, uint localIndex, long unixNs, long nowMs, Span<byte> msg, ReadOnlySpan<byte> injectedEphemeral = default)
    {
        var hs = new Handshake { LocalIndex = localIndex, CreatedMs = nowMs };
        if (injectedEphemeral.Length == 32) injectedEphemeral.CopyTo(hs.EphemeralPrivate);
        else X25519.GeneratePrivateKey(hs.EphemeralPrivate);
        hs.Noise.Initialize(ProtocolName, PrologueBytes, p.PublicKey);
        Span<byte> payload = stackalloc byte[Wire.ClientHelloPayloadLen];
        payload.Clear();
        Wire.WriteTai64n(payload, unixNs);
        payload[Spec.TimestampLen] = AeadMask;
        payload[Spec.TimestampLen + 1] = (byte)PreferredAead;
        Wire.WritePreamble(msg, Spec.TlsHandshake, Wire.ClientHelloLen);
        msg[Wire.TypeOffset] = Wire.TypeClientHello;
        BinaryPrimitives.WriteUInt32BigEndian(msg[Wire.ClientHelloSenderOffset..], localIndex);
        if (!hs.Noise.WriteMessage1(hs.EphemeralPrivate, PublicKey, p.PublicKey, p.StaticShared, payload,
                msg.Slice(Wire.ClientHelloEphemeralOffset, Wire.ClientHelloNoiseLen)))
        {
            hs.Clear();
            return 0;
        }
        WriteMacs(msg, Wire.ClientHelloMac1Offset, p.PublicKey, p, nowMs);
        msg[..Wire.ClientHelloLen].CopyTo(hs.Hello);
        p.Pending?.Clear();
        p.Pending = hs;
        return Wire.ClientHelloLen;
    }

    /// <summary>p's pending hello again, byte for byte but for MAC2 (a cookie may have come since).</summary>
    internal int RepeatClientHello(Peer p, long nowMs, Span<byte> msg)
    {
        p.Pending!.Hello.CopyTo(msg);
        WriteMacs(msg, Wire.ClientHelloMac1Offset, p.PublicKey, p, nowMs);
        return Wire.ClientHelloLen;
    }

    /// <summary>MAC1 proves the sender knows our public key: the first check every hello gets.</summary>
    internal bool Mac1Matches(ReadOnlySpan<byte> hello)
    {
        if (hello.Length != Wire.ClientHelloLen) return false;
        _mac1Hmac ??= IncrementalHash.CreateHMAC(HashAlgorithmName.SHA256, _mac1Key);
        Span<byte> expect = stackalloc byte[Spec.MacLen];
        Mac(_mac1Hmac, hello[..Wire.ClientHelloMac1Offset], expect);
        return CryptographicOperations.FixedTimeEquals(expect, hello.Slice(Wire.ClientHelloMac1Offset, Spec.MacLen));
    }

    /// <summary>False when the sender holds no cookie (it sends MAC2 as zeros).</summary>
    internal static bool HasMac2(ReadOnlySpan<byte> hello) =>
        hello.Length == Wire.ClientHelloLen && hello.Slice(Wire.ClientHelloMac2Offset, Spec.MacLen).ContainsAnyExcept((byte)0);

    /// <summary>True when the hello's MAC2 is keyed by cookie16 (what its source gets from us now).</summary>
    internal static bool CookieMatches(ReadOnlySpan<byte> hello, ReadOnlySpan<byte> cookie16)
    {
        if (hello.Length != Wire.ClientHelloLen) return false;
        ReadOnlySpan<byte> mac2 = hello.Slice(Wire.ClientHelloMac2Offset, Spec.MacLen);
        if (!HasMac2(hello)) return false;                      // a sender without a cookie says so: spare the HMAC
        return MacMatches(cookie16, hello[..Wire.ClientHelloMac2Offset], mac2);
    }

    /// <summary>Reads a ClientHello whose MAC1 (and, under load, MAC2) the caller has checked.</summary>
    internal HandshakeVerdict ConsumeClientHello(ReadOnlySpan<byte> msg, in Endpoint from, long nowMs, HelloState st)
    {
        if (msg.Length != Wire.ClientHelloLen) return HandshakeVerdict.Malformed;
        if (!Mac1Matches(msg)) return HandshakeVerdict.BadMac1;
        st.Noise.Initialize(ProtocolName, PrologueBytes, PublicKey);
        ReadOnlySpan<byte> noise = msg.Slice(Wire.ClientHelloEphemeralOffset, Wire.ClientHelloNoiseLen);
        Key32 remoteStatic = default;
        if (!st.Noise.ReadMessage1Static(PrivateKey, noise, st.RemoteEphemeral, remoteStatic)) return HandshakeVerdict.Failed;
        Peer? p = _findPeer(remoteStatic);
        if (p == null) return HandshakeVerdict.UnknownPeer;
        Span<byte> payload = stackalloc byte[Wire.ClientHelloPayloadLen];
        if (!st.Noise.ReadMessage1Payload(p.StaticShared, noise, payload)) return HandshakeVerdict.Failed;
        payload[..Spec.TimestampLen].CopyTo(st.Timestamp);
        st.AeadMask = payload[Spec.TimestampLen];
        st.PreferredAead = payload[Spec.TimestampLen + 1];
        st.RemoteIndex = BinaryPrimitives.ReadUInt32BigEndian(msg[Wire.ClientHelloSenderOffset..]);
        st.Peer = p;
        return CheckFreshness(p, st, nowMs) ? HandshakeVerdict.Ok : HandshakeVerdict.StaleHello;
    }

    private static bool CheckFreshness(Peer p, HelloState st, long nowMs)
    {
        ulong helloId = BinaryPrimitives.ReadUInt64LittleEndian(st.RemoteEphemeral);
        foreach (ulong seen in p.RecentHelloIds)
            if (seen == helloId) return false;                        // this exact hello again
        bool newer = st.Timestamp.AsSpan().SequenceCompareTo(p.LastHelloTimestamp) > 0;
        if (!newer)
        {
            bool alive = p.LastRxMs >= 0 && nowMs - p.LastRxMs < Spec.KeepaliveTimeoutMs + Spec.RekeyTimeoutMs;
            if (alive || p.Answering(nowMs) || nowMs - p.LastStaleHelloMs < Tune.StaleHelloIntervalMs) return false;
            p.LastStaleHelloMs = nowMs;                               // a clock that went back: answer, slowly
        }
        else st.Timestamp.CopyTo(p.LastHelloTimestamp, 0);
        p.RecentHelloIds[p.RecentHelloNext] = helloId;
        p.RecentHelloNext = (p.RecentHelloNext + 1) % p.RecentHelloIds.Length;
        return true;
    }

    /// <summary><- e, ee, se, psk: answers st and returns the responder's keys (not yet confirmed).</summary>
    internal int CreateServerHello(HelloState st, uint localIndex, long nowMs, Span<byte> msg, out SessionKeys? keys, ReadOnlySpan<byte> injectedEphemeral = default)
    {
        keys = null;
        Peer p = st.Peer!;
        AeadKind aead = ChooseAead(st.AeadMask, st.PreferredAead);
        if (aead == 0) return 0;
        Span<byte> ePriv = stackalloc byte[32];
        if (injectedEphemeral.Length == 32) injectedEphemeral.CopyTo(ePriv);
        else X25519.GeneratePrivateKey(ePriv);
        Span<byte> payload = stackalloc byte[Wire.ServerHelloPayloadLen];
        payload.Clear();
        payload[0] = (byte)aead;
        payload[1] = Spec.PadBlockLen;
        BinaryPrimitives.WriteUInt16BigEndian(payload[2..], (ushort)(Spec.KeepaliveTimeoutMs / 1000));
        Wire.WritePreamble(msg, Spec.TlsHandshake, Wire.ServerHelloLen);
        msg[Wire.TypeOffset] = Wire.TypeServerHello;
        BinaryPrimitives.WriteUInt32BigEndian(msg[Wire.ServerHelloSenderOffset..], localIndex);
        BinaryPrimitives.WriteUInt32BigEndian(msg[Wire.ServerHelloReceiverOffset..], st.RemoteIndex);
        bool ok = st.Noise.WriteMessage2(ePriv, st.RemoteEphemeral, p.PublicKey, p.Psk, payload,
            msg.Slice(Wire.ServerHelloEphemeralOffset, Wire.ServerHelloNoiseLen));
        CryptographicOperations.ZeroMemory(ePriv);
        if (!ok) return 0;
        WriteMacs(msg, Wire.ServerHelloMac1Offset, p.PublicKey, p, nowMs);
        keys = SessionKeys.FromSplit(st.Noise, false, localIndex, st.RemoteIndex, aead);
        return Wire.ServerHelloLen;
    }

    private AeadKind ChooseAead(byte theirMask, byte theirPreferred)
    {
        byte common = (byte)(theirMask & AeadMask);
        if (theirPreferred is 1 or 2 && (common & (1 << theirPreferred)) != 0) return (AeadKind)theirPreferred;
        if ((common & (1 << (int)PreferredAead)) != 0) return PreferredAead;
        if ((common & (1 << (int)AeadKind.ChaCha20Poly1305)) != 0) return AeadKind.ChaCha20Poly1305;
        if ((common & (1 << (int)AeadKind.Aes256Gcm)) != 0) return AeadKind.Aes256Gcm;
        return 0;
    }

    /// <summary>MAC1 check of a ServerHello; the caller then finds the pending handshake by receiver index.</summary>
    internal HandshakeVerdict CheckServerHelloMac(ReadOnlySpan<byte> msg)
    {
        if (msg.Length != Wire.ServerHelloLen) return HandshakeVerdict.Malformed;
        return MacMatches(_mac1Key, msg[..Wire.ServerHelloMac1Offset], msg.Slice(Wire.ServerHelloMac1Offset, Spec.MacLen))
            ? HandshakeVerdict.Ok : HandshakeVerdict.BadMac1;
    }

    /// <summary>-> reads the ServerHello for p's pending handshake; on Ok returns the initiator's keys.</summary>
    internal HandshakeVerdict ConsumeServerHello(ReadOnlySpan<byte> msg, Peer p, out SessionKeys? keys)
    {
        keys = null;
        Handshake? hs = p.AwaitingAnswer(BinaryPrimitives.ReadUInt32BigEndian(msg[Wire.ServerHelloReceiverOffset..]));
        if (hs == null) return HandshakeVerdict.UnknownIndex;
        Span<byte> payload = stackalloc byte[Wire.ServerHelloPayloadLen];
        // Work on a copy so a forged ServerHello cannot spoil the real one still to come.
        var trial = new NoiseState { Ck = hs.Noise.Ck, H = hs.Noise.H, K = hs.Noise.K, N = hs.Noise.N };
        ReadOnlySpan<byte> noise = msg.Slice(Wire.ServerHelloEphemeralOffset, Wire.ServerHelloNoiseLen);
        bool ok = trial.ReadMessage2(hs.EphemeralPrivate, PrivateKey, p.Psk, noise, payload);
        // During a rotation the responder may already use the next network secret, or still the
        // last one: psk2 is mixed into the ServerHello only, so the initiator tries each it accepts.
        for (int i = 0; !ok && i < AcceptPsks.Length; i++)
        {
            trial.Clear();
            trial = new NoiseState { Ck = hs.Noise.Ck, H = hs.Noise.H, K = hs.Noise.K, N = hs.Noise.N };
            ok = trial.ReadMessage2(hs.EphemeralPrivate, PrivateKey, AcceptPsks[i], noise, payload);
        }
        if (!ok)
        {
            trial.Clear();
            return HandshakeVerdict.Failed;
        }
        var aead = (AeadKind)payload[0];
        if (aead is not (AeadKind.ChaCha20Poly1305 or AeadKind.Aes256Gcm) || (AeadMask & (1 << (int)aead)) == 0)
        {
            trial.Clear();
            return HandshakeVerdict.Malformed;
        }
        uint remoteIndex = BinaryPrimitives.ReadUInt32BigEndian(msg[Wire.ServerHelloSenderOffset..]);
        keys = SessionKeys.FromSplit(trial, true, hs.LocalIndex, remoteIndex, aead);
        return HandshakeVerdict.Ok;
    }

    /// <summary>The cookie a source address gets from us now: the secret behind it changes every 2 minutes.</summary>
    internal void MakeCookie(in Endpoint from, long nowMs, Span<byte> cookie16)
    {
        if (_cookieHmac == null || nowMs - _cookieSecretAtMs >= Spec.CookieRefreshTimeMs)
        {
            RandomNumberGenerator.Fill(_cookieSecret);
            _cookieHmac?.Dispose();
            _cookieHmac = IncrementalHash.CreateHMAC(HashAlgorithmName.SHA256, _cookieSecret);
            _cookieSecretAtMs = nowMs;
        }
        Span<byte> addr = stackalloc byte[18];
        from.WriteAddress16(addr);
        BinaryPrimitives.WriteUInt16BigEndian(addr[16..], from.Port);
        Mac(_cookieHmac, addr, cookie16);
    }

    /// <summary>Answers a ClientHello that came without a valid cookie while we are under load.</summary>
    internal int CreateCookieReply(ReadOnlySpan<byte> hello, ReadOnlySpan<byte> cookie16, Span<byte> msg)
    {
        Wire.WritePreamble(msg, Spec.TlsHandshake, Wire.CookieReplyLen);
        msg[Wire.TypeOffset] = Wire.TypeCookieReply;
        hello.Slice(Wire.ClientHelloSenderOffset, 4).CopyTo(msg[Wire.CookieReplyReceiverOffset..]);
        // The cookie key is ours for life (restarts included): a nonce must never repeat under it, so
        // it counts up from a random start instead of being drawn (which also spares a random source
        // call per reply under a flood).
        for (int i = 0; i < _cookieNonce.Length && ++_cookieNonce[i] == 0; i++) { }
        Span<byte> nonce = msg.Slice(Wire.CookieReplyNonceOffset, 12);
        _cookieNonce.CopyTo(nonce);
        _cookieAead ??= new Aead(AeadKind.ChaCha20Poly1305, _cookieKey);
        _cookieAead.Seal(nonce, cookie16, hello.Slice(Wire.ClientHelloMac1Offset, Spec.MacLen), msg.Slice(Wire.CookieReplyCookieOffset, Spec.MacLen + Spec.TagLen));
        return Wire.CookieReplyLen;
    }

    /// <summary>Stores the cookie of a CookieReply that answers p's last hello.</summary>
    internal bool ConsumeCookieReply(ReadOnlySpan<byte> msg, Peer p, long nowMs)
    {
        if (msg.Length != Wire.CookieReplyLen) return false;
        Key32 key = default;
        MacKey("cookie--", p.PublicKey, ref key);
        using var aead = new Aead(AeadKind.ChaCha20Poly1305, key);
        Span<byte> cookie = stackalloc byte[Spec.MacLen];
        if (!aead.Open(msg.Slice(Wire.CookieReplyNonceOffset, 12), msg.Slice(Wire.CookieReplyCookieOffset, Spec.MacLen + Spec.TagLen), p.LastMac1, cookie))
            return false;
        cookie.CopyTo(p.Cookie);
        p.CookieReceivedMs = nowMs;
        return true;
    }
}

/// <summary>Who may make us do Diffie-Hellman: a token bucket per source address (bounded table) and
/// one for everybody. A source over its rate is dropped; when the global bucket is empty, hellos
/// must carry a cookie (MAC2) instead, so real peers still get in while a flood is answered cheaply.</summary>
internal sealed class Admission
{
    private struct Bucket { internal double Tokens; internal long AtMs; }
    private const int MaxSources = 4096;
    private readonly Dictionary<UInt128, Bucket> _sources = new();
    private Bucket _global, _cookies, _knownCookies;
    internal int Rate, RatePerSource, MaxSessions;
    internal long RefusedSource, RefusedGlobal, RefusedSessions, RefusedCookies;
    internal bool ForceUnderLoad;                 // tests

    /// <summary>Cookie replies per second: a flood of hellos is answered at most this often, so the
    /// node neither spends its loop on them nor reflects them at whatever address they forge.</summary>
    internal int CookieRate => Rate * Tune.CookieRepliesPerHandshake;

    internal Admission(int rate, int ratePerSource, int maxSessions)
    {
        Rate = rate;
        RatePerSource = ratePerSource;
        MaxSessions = maxSessions;
        _global = new Bucket { Tokens = rate, AtMs = long.MinValue };
        _cookies = _knownCookies = new Bucket { Tokens = CookieRate, AtMs = long.MinValue };
    }

    /// <summary>May a hello that lacks a cookie get a cookie reply? When the budget is spent, hellos
    /// from where a peer was last authenticated draw on a second one (AllowPeerCookieReply), so a
    /// peer that restarts during a flood of forged hellos still gets its cookie: a forger would have
    /// to know and spoof that exact address and port.</summary>
    internal bool AllowCookieReply(long nowMs) => Take(ref _cookies, CookieRate, nowMs);

    internal bool AllowPeerCookieReply(long nowMs) => Take(ref _knownCookies, CookieRate, nowMs);

    private static bool Take(ref Bucket b, int ratePerSecond, long nowMs)
    {
        if (b.AtMs != long.MinValue) b.Tokens = Math.Min(ratePerSecond, b.Tokens + (nowMs - b.AtMs) * ratePerSecond / 1000.0);
        b.AtMs = nowMs;
        if (b.Tokens < 1) return false;
        b.Tokens -= 1;
        return true;
    }

    /// <summary>False (and counted) when this source sent more hellos than its rate allows.</summary>
    internal bool AllowSource(in Endpoint from, long nowMs)
    {
        if (!_sources.TryGetValue(from.Address, out Bucket b))
        {
            if (_sources.Count >= MaxSources) _sources.Clear();      // bounded: forget everybody rather than grow
            b = new Bucket { Tokens = RatePerSource, AtMs = nowMs };
        }
        bool ok = Take(ref b, RatePerSource, nowMs);
        _sources[from.Address] = b;
        if (!ok) RefusedSource++;
        return ok;
    }

    /// <summary>True when the global budget is spent: the hello then needs a valid cookie.</summary>
    internal bool UnderLoad(long nowMs)
    {
        if (ForceUnderLoad || !Take(ref _global, Rate, nowMs)) { RefusedGlobal++; return true; }
        return false;
    }

    internal int TrackedSources => _sources.Count;

    // Sources whose hellos went unanswered (the cookie budget spent) MuteAfterUnanswered times within
    // a second are muted for the rest of it: their hellos are dropped before MAC1, sparing an HMAC
    // each, and counted as rate_source. A muted address is no worse off than before (its hellos
    // would have gone unanswered too); the endpoints of our peers are never muted (Node).
    private const int MuteAfterUnanswered = 8;
    private readonly Dictionary<UInt128, (long SinceMs, int Count)> _unanswered = new();

    internal bool Muted(in Endpoint from, long nowMs) =>
        _unanswered.Count > 0 && _unanswered.TryGetValue(from.Address, out var u) && nowMs - u.SinceMs < 1000 && u.Count >= MuteAfterUnanswered;

    internal void Unanswered(in Endpoint from, long nowMs)
    {
        if (!_unanswered.TryGetValue(from.Address, out var u) || nowMs - u.SinceMs >= 1000)
        {
            if (_unanswered.Count >= MaxSources) _unanswered.Clear();
            u = (nowMs, 0);
        }
        _unanswered[from.Address] = (u.SinceMs, u.Count + 1);
    }
}

// ==== 11. Sessions & replay window ===============================================================
// A Session is one pair of transport keys from one handshake: an AEAD and a header-mask key per
// direction, the send counter, and the receive ReplayWindow. A peer holds up to three, in the fields
// Peer.Next (responder side, keys derived but not yet confirmed by a Bind), Current, and Previous
// (kept so records in flight during a rotation still open). IndexTable maps our local index to its session so
// a record finds its keys without knowing where it came from (roaming).
//
// ReplayWindow follows RFC 6479: a ring of 64-bit words; a counter is accepted once, and only if it
// is within WindowSize of the highest accepted counter. Check with CanAccept before decrypting,
// mark with Accept only after the tag verified, so forged records cannot move the window.

internal sealed class ReplayWindow
{
    private const int WordBits = 64;
    private const int RingWords = 64;
    internal const int WindowSize = (RingWords - 1) * WordBits;   // 4032 counters
    private readonly ulong[] _ring = new ulong[RingWords];
    private ulong _highest;

    internal bool CanAccept(ulong counter)
    {
        if (counter >= Spec.RejectAfterMessages) return false;
        if (counter > _highest) return true;
        if (_highest - counter >= WindowSize) return false;
        return (_ring[(int)((counter / WordBits) % RingWords)] & (1UL << (int)(counter % WordBits))) == 0;
    }

    internal ulong Highest => _highest;

    internal bool IsTooOld(ulong counter) =>
        counter >= Spec.RejectAfterMessages || (counter <= _highest && _highest - counter >= WindowSize);

    internal bool Accept(ulong counter)
    {
        if (counter >= Spec.RejectAfterMessages) return false;
        ulong index = counter / WordBits;
        if (counter > _highest)
        {
            ulong current = _highest / WordBits;
            ulong diff = Math.Min(index - current, RingWords);
            for (ulong i = 1; i <= diff; i++) _ring[(int)((current + i) % RingWords)] = 0;
            _highest = counter;
        }
        else if (_highest - counter >= WindowSize) return false;
        ref ulong word = ref _ring[(int)(index % RingWords)];
        ulong bit = 1UL << (int)(counter % WordBits);
        if ((word & bit) != 0) return false;
        word |= bit;
        return true;
    }

    internal void Reset()
    {
        Array.Clear(_ring);
        _highest = 0;
    }
}

internal sealed class Session : IDisposable
{
    internal readonly Peer Peer;
    internal readonly uint LocalIndex, RemoteIndex;
    internal readonly bool IsInitiator;
    internal readonly long CreatedMs, CreatedTicks;      // CreatedTicks: Stopwatch, for the responder's RTT
    internal readonly AeadKind AeadKind;
    private readonly Aead _send, _receive;
    internal readonly ulong SendMaskKey, ReceiveMaskKey;
    internal ulong SendCounter;
    internal readonly ReplayWindow Window = new();
    internal ulong Received;                    // records opened: with Window.Highest, the loss on the path (§12.1)
    internal bool Confirmed;                    // initiator: always; responder: after the first record (the Bind)
    internal bool Disposed;

    internal Session(Peer peer, SessionKeys keys, long nowMs)
    {
        Peer = peer;
        LocalIndex = keys.LocalIndex;
        RemoteIndex = keys.RemoteIndex;
        IsInitiator = keys.IsInitiator;
        CreatedMs = nowMs;
        CreatedTicks = Stopwatch.GetTimestamp();
        AeadKind = keys.Aead;
        _send = new Aead(keys.Aead, keys.Send);
        _receive = new Aead(keys.Aead, keys.Receive);
        SendMaskKey = keys.SendMaskKey;
        ReceiveMaskKey = keys.ReceiveMaskKey;
        Confirmed = keys.IsInitiator;
        keys.Clear();
    }

    internal Aead SendAead => _send;
    internal Aead ReceiveAead => _receive;

    public void Dispose()
    {
        if (Disposed) return;
        Disposed = true;
        _send.Dispose();              // the base library frees (and clears) the native key schedule
        _receive.Dispose();
    }
}

/// <summary>Local index -> session, and local index -> peer for handshakes in flight.</summary>
internal sealed class IndexTable
{
    private readonly Dictionary<uint, Session> _sessions = new();
    private readonly Dictionary<uint, Peer> _handshakes = new();

    internal int Count => _sessions.Count + _handshakes.Count;
    internal int SessionCount => _sessions.Count;

    /// <summary>A random index not in use (0 is never handed out, so it can mean "none").</summary>
    internal uint NewIndex()
    {
        Span<byte> b = stackalloc byte[4];
        while (true)
        {
            RandomNumberGenerator.Fill(b);
            uint i = BinaryPrimitives.ReadUInt32LittleEndian(b);
            if (i != 0 && !_sessions.ContainsKey(i) && !_handshakes.ContainsKey(i)) return i;
        }
    }

    internal void AddSession(Session s) => _sessions[s.LocalIndex] = s;
    internal void AddHandshake(uint index, Peer p) => _handshakes[index] = p;
    internal Session? FindSession(uint index) => _sessions.TryGetValue(index, out Session? s) ? s : null;
    internal Peer? FindHandshake(uint index) => _handshakes.TryGetValue(index, out Peer? p) ? p : null;
    internal void RemoveHandshake(uint index) => _handshakes.Remove(index);

    internal void RemoveSession(Session? s)
    {
        if (s == null) return;
        _sessions.Remove(s.LocalIndex);
        s.Dispose();
    }
}

// ==== 12. Record layer ===========================================================================
// Every transport record (all integers big-endian):
//   0  17 03 03 LL LL     TLS application-data preamble; LL = length of what follows
//   5  flags   (masked)   Data 1, Keepalive 2, Rekey 4, Bind 8, Close 16, Control 32, Relay 64, Parity 128
//   6  padLen  (masked)   zero bytes appended to the payload before sealing
//   7  receiver index     the session index the receiver chose
//  11  counter            64-bit, never repeats under one key; also the AEAD nonce
//  19  AEAD(payload ‖ padding) ‖ 16-byte tag, with bytes 0..19 as associated data
// Flags and padLen are XORed with two bytes of Mix(maskKey + counter) so they differ on every record;
// the mask key comes from the handshake, so only the two ends can read them. Padding rounds the
// payload up to a multiple of PadBlockLen, never past the MTU, so equal packets give equal records.
// Nonce: 32 zero bits then the counter little-endian (as Noise's ChaChaPoly). Seal works in place:
// the payload already sits at PayloadOffset in the caller's slot. Open never throws.

[Flags]
internal enum RecordFlags : byte { Data = 1, Keepalive = 2, Rekey = 4, Bind = 8, Close = 16, Control = 32, Relay = 64, Parity = 128 }

internal enum RecordKind { Invalid, ClientHello, ServerHello, CookieReply, Transport, Join }

internal enum OpenVerdict { Ok, Truncated, Malformed, BadAuth, Replayed, TooOld }

internal static class Record
{
    internal const int FlagsOffset = 5, PadOffset = 6, IndexOffset = 7, CounterOffset = 11;
    internal const int HeaderLen = 19;
    internal const int PayloadOffset = HeaderLen;
    internal const int OverheadLen = HeaderLen + Spec.TagLen;           // 35

    /// <summary>What the underlay carries around an inner packet: IP and UDP headers and the record's
    /// own bytes. A record never pads past the MTU (PaddedLen), so an MTU-sized packet needs exactly this.</summary>
    internal static int UnderlayOverheadLen(bool v6Underlay) => (v6Underlay ? 40 : 20) + 8 + OverheadLen;
    /// <summary>Parity stands alone (§12.1); every other combination is the sender's business.</summary>
    internal static bool FlagsValid(RecordFlags f) => (f & RecordFlags.Parity) == 0 || f == RecordFlags.Parity;
    internal const int MaxJoinLen = 600;

    /// <summary>What a datagram claims to be, from its preamble, type and length alone.</summary>
    internal static RecordKind Classify(ReadOnlySpan<byte> d)
    {
        if (d.Length < Spec.PreambleLen + 1 || d[1] != 0x03 || d[2] != 0x03) return RecordKind.Invalid;
        if (BinaryPrimitives.ReadUInt16BigEndian(d[3..]) != d.Length - Spec.PreambleLen) return RecordKind.Invalid;
        if (d[0] == Spec.TlsApplicationData) return d.Length >= OverheadLen ? RecordKind.Transport : RecordKind.Invalid;
        if (d[0] != Spec.TlsHandshake) return RecordKind.Invalid;
        return d[Wire.TypeOffset] switch
        {
            Wire.TypeClientHello when d.Length == Wire.ClientHelloLen => RecordKind.ClientHello,
            Wire.TypeServerHello when d.Length == Wire.ServerHelloLen => RecordKind.ServerHello,
            Wire.TypeCookieReply when d.Length == Wire.CookieReplyLen => RecordKind.CookieReply,
            Invites.TypeJoinHello when d.Length <= MaxJoinLen => RecordKind.Join,
            _ => RecordKind.Invalid,
        };
    }

    internal static uint ReceiverIndex(ReadOnlySpan<byte> d) => BinaryPrimitives.ReadUInt32BigEndian(d[IndexOffset..]);
    internal static ulong Counter(ReadOnlySpan<byte> d) => BinaryPrimitives.ReadUInt64BigEndian(d[CounterOffset..]);

    internal static int PaddedLen(int payloadLen, int mtu)
    {
        int padded = (payloadLen + Spec.PadBlockLen - 1) / Spec.PadBlockLen * Spec.PadBlockLen;
        return Math.Max(payloadLen, Math.Min(padded, mtu));
    }

    /// <summary>Seals the payload at slot[PayloadOffset..+payloadLen] in place; returns the record length.</summary>
    internal static int Seal(Session s, Span<byte> slot, int payloadLen, RecordFlags flags, int mtu)
    {
        int plainLen = PaddedLen(payloadLen, mtu);
        int padLen = plainLen - payloadLen;
        int total = HeaderLen + plainLen + Spec.TagLen;
        slot.Slice(PayloadOffset + payloadLen, padLen).Clear();
        ulong counter = s.SendCounter++;
        slot[0] = Spec.TlsApplicationData; slot[1] = 0x03; slot[2] = 0x03;
        BinaryPrimitives.WriteUInt16BigEndian(slot[3..], (ushort)(total - Spec.PreambleLen));
        ulong mask = Mix(s.SendMaskKey + counter);
        slot[FlagsOffset] = (byte)((byte)flags ^ (byte)mask);
        slot[PadOffset] = (byte)(padLen ^ (byte)(mask >> 8));
        BinaryPrimitives.WriteUInt32BigEndian(slot[IndexOffset..], s.RemoteIndex);
        BinaryPrimitives.WriteUInt64BigEndian(slot[CounterOffset..], counter);
        Span<byte> nonce = stackalloc byte[Spec.NonceLen];
        NoiseState.Nonce(nonce, counter);
        Span<byte> body = slot.Slice(PayloadOffset, plainLen + Spec.TagLen);
        s.SendAead.Seal(nonce, body[..plainLen], slot[..HeaderLen], body);
        return total;
    }

    /// <summary>Opens a transport record in place. On Ok the payload is record[PayloadOffset..+payloadLen].</summary>
    internal static OpenVerdict Open(Session s, Span<byte> record, out int payloadLen, out RecordFlags flags)
    {
        payloadLen = 0;
        flags = 0;
        if (record.Length < OverheadLen) return OpenVerdict.Truncated;
        ulong counter = Counter(record);
        if (!s.Window.CanAccept(counter)) return s.Window.IsTooOld(counter) ? OpenVerdict.TooOld : OpenVerdict.Replayed;
        Span<byte> nonce = stackalloc byte[Spec.NonceLen];
        NoiseState.Nonce(nonce, counter);
        int plainLen = record.Length - OverheadLen;
        Span<byte> body = record[PayloadOffset..];
        if (!s.ReceiveAead.Open(nonce, body, record[..HeaderLen], body)) return OpenVerdict.BadAuth;
        if (!s.Window.Accept(counter)) return OpenVerdict.Replayed;
        ulong mask = Mix(s.ReceiveMaskKey + counter);
        flags = (RecordFlags)(record[FlagsOffset] ^ (byte)mask);
        int padLen = (byte)(record[PadOffset] ^ (byte)(mask >> 8));
        if (!FlagsValid(flags) || padLen > plainLen) return OpenVerdict.Malformed;
        payloadLen = plainLen - padLen;
        return OpenVerdict.Ok;
    }

    /// <summary>Whether a record the window already took authenticates (in place; the record is
    /// spent): the late original of a record parity rebuilt, told apart from a forged copy.</summary>
    internal static bool Authentic(Session s, Span<byte> record)
    {
        if (record.Length < OverheadLen) return false;
        Span<byte> nonce = stackalloc byte[Spec.NonceLen];
        NoiseState.Nonce(nonce, Counter(record));
        Span<byte> body = record[PayloadOffset..];
        return s.ReceiveAead.Open(nonce, body, record[..HeaderLen], body);
    }

    // SplitMix64's finaliser: cheap, and every counter gives an unrelated mask.
    internal static ulong Mix(ulong x)
    {
        x ^= x >> 30; x *= 0xBF58476D1CE4E5B9UL;
        x ^= x >> 27; x *= 0x94D049BB133111EBUL;
        return x ^ (x >> 31);
    }
}

// ---- 12.1 Parity records (forward error correction) ----
// A lossy path costs TCP far more than the lost bytes: each loss stalls the stream for a round
// trip, and even 0.2 % loss takes a quarter of its rate. So the receiver measures what never
// arrived (gaps in each session's counters, twice a second) and tells the sender (an exchange
// message FecLoss, §15); while the reported loss is above zero and --fec is auto, the sender
// follows every group of up to K data records it sends directly with R parity records (Fec.Size:
// more rows as the loss grows, about 9 % more records at 2 %). Row r of a group is the sum over
// GF(2^8) of g^(r·e)·D for its members D, e the number of members newer than D: row 0 is their
// XOR, and any m missing members are rebuilt from any m rows (a Vandermonde system, solved by
// Gaussian elimination). A parity record is a record with the flag Parity alone:
//   0  row    0..3
//   1  back   its own counter minus the counter of the group's newest member (row + 1)
//   2  mask   64 bits: bit i set = the data record with counter (newest - i) is a member
//  10  body   the row over the members' payloads, each zero-extended to the longest
// The receiver keeps the payloads of its last RingLen data records and the rows of the group in
// hand. A rebuilt payload is delivered only if its counter passes the replay window, and then
// takes the path of any data record (IP header, source check, isolation, filter). The parity
// itself opened under the session's keys and passed the window, so a forged or replayed parity
// record is dropped before it is used, and nothing the peer did not seal can come out of one.

internal static class Fec
{
    internal const int HeaderLen = 10, MaxRows = 4;
    internal const int MaxMembers = 48;          // per group, within 64 counters
    // Payloads a receiver keeps (by counter mod RingLen): a group's 64 counters, and the batch of up
    // to 64 records its parity leaves behind (a worker sends a TUN batch's parity after the batch).
    internal const int RingLen = 128;
    internal const int HoldMs = 3;               // a group waits at most this long for more members
    internal const int ReportIntervalMs = 500;   // a receiver measures and reports loss this often
    internal const int ReportLifetimeMs = 2500;  // a sender that heard no report for this long adds no parity
    internal const int MinMeasured = 64;         // records an interval needs before its loss counts
    internal const int IdleMs = 60_000;          // parity state unused this long is freed

    private static readonly byte[] Exp = new byte[510], Log = new byte[256];

    static Fec()
    {
        int x = 1;
        for (int i = 0; i < 255; i++)
        {
            Exp[i] = Exp[i + 255] = (byte)x;
            Log[x] = (byte)i;
            x <<= 1;
            if (x > 255) x ^= 0x11D;
        }
    }

    internal static byte Mul(byte a, byte b) => a == 0 || b == 0 ? (byte)0 : Exp[Log[a] + Log[b]];
    internal static byte Inverse(byte a) => Exp[(255 - Log[a]) % 255];    // a != 0
    internal static byte Pow2(int e) => Exp[e % 255];

    /// <summary>Members per group and rows for a reported loss (parts per 10,000); (0, 0) on a clean
    /// path. Sized so that a group is lost (more members missing than rows arrive) for well under
    /// 0.05 % of the records: TCP over a 20 ms path loses a tenth of its rate to that.</summary>
    internal static (int Members, int Rows) Size(int lossBp) => lossBp switch
    {
        <= 0 => (0, 0),
        < 20 => (32, 1),
        < 60 => (40, 2),
        < 150 => (40, 3),
        _ => (Math.Clamp(8000 / lossBp, 8, 40), 4),
    };

    /// <summary>acc ^= d (acc at least as long as d).</summary>
    internal static void Xor(Span<byte> acc, ReadOnlySpan<byte> d)
    {
        int i = 0;
        for (; i + System.Numerics.Vector<byte>.Count <= d.Length; i += System.Numerics.Vector<byte>.Count)
            (new System.Numerics.Vector<byte>(acc[i..]) ^ new System.Numerics.Vector<byte>(d[i..])).CopyTo(acc[i..]);
        for (; i < d.Length; i++) acc[i] ^= d[i];
    }

    /// <summary>acc = 2^times·acc ^ d, d zero-extended: one Horner step of a row.</summary>
    internal static void MulPow2Xor(Span<byte> acc, ReadOnlySpan<byte> d, int times)
    {
        var high = new System.Numerics.Vector<byte>(0x80);
        var poly = new System.Numerics.Vector<byte>(0x1D);
        int i = 0;
        for (; i + System.Numerics.Vector<byte>.Count <= acc.Length; i += System.Numerics.Vector<byte>.Count)
        {
            var v = new System.Numerics.Vector<byte>(acc[i..]);
            for (int t = 0; t < times; t++) v = (v + v) ^ (System.Numerics.Vector.GreaterThanOrEqual(v, high) & poly);
            v.CopyTo(acc[i..]);
        }
        for (; i < acc.Length; i++) acc[i] = Mul(acc[i], Pow2(times));
        Xor(acc, d);
    }

    /// <summary>products[v] = c·v for every byte v.</summary>
    internal static void Products(byte c, Span<byte> products)
    {
        for (int v = 0; v < 256; v++) products[v] = Mul((byte)v, c);
    }

    /// <summary>acc ^= c·d, by a table of c's products (rebuilding only).</summary>
    internal static void MulXor(Span<byte> acc, ReadOnlySpan<byte> d, byte c, Span<byte> products)
    {
        if (c == 1) { Xor(acc, d); return; }
        Products(c, products);
        for (int i = 0; i < d.Length; i++) acc[i] ^= products[d[i]];
    }
}

/// <summary>A sender's open group for one peer: its members so far and their rows.</summary>
internal sealed class FecSender
{
    private readonly byte[][] _rows = new byte[Fec.MaxRows][];
    private Session? _session;
    private ulong _newest, _oldest, _mask;
    private int _len;
    internal int Members, Want, Rows;              // members so far; group size and rows for the reported loss
    internal long OpenedMs, UsedMs;
    internal long ParityBytes;

    internal FecSender(int mtu) { for (int r = 0; r < Fec.MaxRows; r++) _rows[r] = new byte[mtu]; }

    internal Session? GroupSession => _session;
    internal int RowsOfGroup => Members == 1 ? 1 : Rows;    // one member: row 0 is a copy, enough

    internal PacketBatch? Batch;                   // the worker batch the group's members left in (null: none)

    /// <summary>True when the record about to be sealed (counter, session, worker batch) cannot join
    /// the open group: members span 64 counters at most, and leave in one worker's batch (its parity
    /// follows that batch out).</summary>
    internal bool MustClose(Session s, ulong counter, PacketBatch? batch) =>
        Members > 0 && (s != _session || counter - _oldest >= 64 || batch != Batch);

    /// <summary>The distance from the newest member to a parity record sealed with `counter`.</summary>
    internal ulong Back(ulong counter) => counter - _newest;

    internal void Add(Session s, ulong counter, ReadOnlySpan<byte> payload, long nowMs)
    {
        if (Members == 0)
        {
            _session = s;
            _oldest = counter;
            _mask = 0;
            _len = 0;
            OpenedMs = nowMs;
        }
        else _mask <<= (int)(counter - _newest);
        _mask |= 1;
        _newest = counter;
        if (payload.Length > _len)
        {
            for (int r = 0; r < Rows; r++) _rows[r].AsSpan(_len, payload.Length - _len).Clear();
            _len = payload.Length;
        }
        Fec.Xor(_rows[0], payload);
        for (int r = 1; r < Rows; r++) Fec.MulPow2Xor(_rows[r].AsSpan(0, _len), payload, r);
        Members++;
        UsedMs = nowMs;
    }

    /// <summary>Writes row's parity payload, to be sealed with counter `counter`, at
    /// slot[Record.PayloadOffset..]; its length. Other records (keepalives, exchange, relayed) may
    /// have taken counters since the newest member: back says how many.</summary>
    internal int Write(Span<byte> slot, int row, ulong counter)
    {
        Span<byte> m = slot[Record.PayloadOffset..];
        m[0] = (byte)row;
        m[1] = (byte)(counter - _newest);
        BinaryPrimitives.WriteUInt64BigEndian(m[2..], _mask);
        _rows[row].AsSpan(0, _len).CopyTo(m[Fec.HeaderLen..]);
        return Fec.HeaderLen + _len;
    }

    internal void Close()
    {
        Members = 0;
        _session = null;
    }
}

/// <summary>A receiver's recent payloads of one peer, and the rows of the group in hand.</summary>
internal sealed class FecReceiver
{
    internal const long Unneeded = -1, Malformed = -2, Unrecoverable = -3, Waiting = -4;
    private readonly byte[] _ring;
    private readonly ulong[] _tag = new ulong[Fec.RingLen];       // counter + 1 of the payload in each slot (0: none)
    private readonly ulong[] _rebuilt = new ulong[Fec.RingLen];   // counter + 1 of the payloads rebuilt lately
    private readonly ushort[] _len = new ushort[Fec.RingLen];
    private readonly int _slotLen;
    private readonly byte[][] _rows = new byte[Fec.MaxRows][];     // the group in hand: its rows as they came
    private readonly byte[][] _out = new byte[Fec.MaxRows][];      // what a rebuild solves for
    private readonly int[] _rowOf = new int[Fec.MaxRows];
    private int _rowCount, _bodyLen;
    private ulong _groupNewest, _groupMask;
    private Session? _groupSession;
    private readonly byte[] _products = new byte[256];
    private readonly byte[] _matrix = new byte[Fec.MaxRows * Fec.MaxRows * 2];   // [M | I], then [I | M^-1]
    private readonly ulong[] _missing = new ulong[Fec.MaxRows];
    internal Session? Session;                                   // the ring's payloads are this session's
    internal long UsedMs;
    // Members of the groups whose parity came, and those of them missing when it came (lost, or
    // still on their way): what the sender's parity must cover, reordering included.
    internal long SeenMembers, SeenMissing;
    private Session? _countedSession;
    private ulong _countedNewest, _countedMask;
    // The rebuilt payloads beyond the first (in the caller's slot): counters and bodies.
    internal int SpareCount;
    internal readonly ulong[] SpareCounter = new ulong[Fec.MaxRows - 1];

    internal FecReceiver(int mtu)
    {
        _slotLen = mtu;
        _ring = new byte[Fec.RingLen * mtu];
        for (int r = 0; r < Fec.MaxRows; r++) { _rows[r] = new byte[mtu]; _out[r] = new byte[mtu]; }
    }

    /// <summary>The k-th rebuilt payload beyond the first (zero-extended to the group's longest).</summary>
    internal Span<byte> Spare(int k) => _out[k + 1].AsSpan(0, _bodyLen);

    internal void Keep(Session s, ulong counter, ReadOnlySpan<byte> payload)
    {
        if (s != Session && !Follow(s)) return;
        if (payload.Length > _slotLen) return;
        int i = (int)(counter % Fec.RingLen);
        payload.CopyTo(_ring.AsSpan(i * _slotLen));
        _tag[i] = counter + 1;
        _len[i] = (ushort)payload.Length;
    }

    /// <summary>Whether parity rebuilt this record of s lately (its own copy then comes late).</summary>
    internal bool WasRebuilt(Session s, ulong counter) => s == Session && _rebuilt[(int)(counter % Fec.RingLen)] == counter + 1;

    // The ring follows the newest session; an older one's stragglers during a rotation are ignored.
    private bool Follow(Session s)
    {
        if (Session != null && !Session.Disposed && s.CreatedMs < Session.CreatedMs) return false;
        Array.Clear(_tag);
        Array.Clear(_rebuilt);
        Session = s;
        _groupSession = null;
        return true;
    }

    private ReadOnlySpan<byte> Held(ulong counter)
    {
        int i = (int)(counter % Fec.RingLen);
        return _tag[i] == counter + 1 ? _ring.AsSpan(i * _slotLen, _len[i]) : default;
    }

    /// <summary>Uses the parity payload m (opened, of session s, own counter): when the rows in hand
    /// now cover the group's missing members, the first rebuilt payload is left at m[Fec.HeaderLen..]
    /// and its counter returned, the others in Spare; else Unneeded (nothing missing), Malformed,
    /// Unrecoverable, or Waiting (for more rows).</summary>
    internal long Use(Session s, ulong counter, Span<byte> m, long nowMs)
    {
        SpareCount = 0;
        if (m.Length <= Fec.HeaderLen || m.Length - Fec.HeaderLen > _slotLen || m[0] >= Fec.MaxRows || m[1] <= m[0] || m[1] > 64) return Malformed;
        ulong mask = BinaryPrimitives.ReadUInt64BigEndian(m[2..]);
        if ((mask & 1) == 0 || System.Numerics.BitOperations.PopCount(mask) > Fec.MaxMembers ||
            counter < (ulong)(m[1] + 63 - System.Numerics.BitOperations.LeadingZeroCount(mask))) return Malformed;
        UsedMs = nowMs;
        if (s != Session && !Follow(s)) return Unrecoverable;
        ulong newest = counter - m[1];
        Span<byte> body = m[Fec.HeaderLen..];
        int missing = 0;
        for (ulong bits = mask; bits != 0; bits &= bits - 1)
        {
            ulong c = newest - (ulong)System.Numerics.BitOperations.TrailingZeroCount(bits);
            if (!Held(c).IsEmpty) continue;
            if (!s.Window.CanAccept(c)) return Unrecoverable;      // arrived, but no longer in the ring
            if (missing < Fec.MaxRows) _missing[missing] = c;
            missing++;
        }
        if (s != _countedSession || newest != _countedNewest || mask != _countedMask)   // a group's first row here
        {
            _countedSession = s;
            _countedNewest = newest;
            _countedMask = mask;
            SeenMembers += System.Numerics.BitOperations.PopCount(mask);
            SeenMissing += missing;
        }
        if (missing == 0) { _groupSession = null; return Unneeded; }
        if (_groupSession != s || _groupNewest != newest || _groupMask != mask || _bodyLen != body.Length)
        {
            _groupSession = s;
            _groupNewest = newest;
            _groupMask = mask;
            _bodyLen = body.Length;
            _rowCount = 0;
        }
        if (missing > Fec.MaxRows) return Unrecoverable;
        if (_rowCount + 1 < missing)                            // keep this row for the group's next ones
        {
            if (_rowCount < Fec.MaxRows && Array.IndexOf(_rowOf, m[0], 0, _rowCount) < 0)
            {
                body.CopyTo(_rows[_rowCount]);
                _rowOf[_rowCount++] = m[0];
            }
            return Waiting;
        }
        // As many rows in hand as members missing (this one last, in the caller's slot): fold the
        // held members out of each, leaving the sum over the missing only, and solve for them.
        _groupSession = null;
        Span<byte> used = stackalloc byte[Fec.MaxRows];
        for (int i = 0; i < missing - 1; i++) used[i] = (byte)_rowOf[i];
        used[missing - 1] = m[0];
        for (int i = 0; i < missing; i++) Fold(Row(i, missing, body), used[i], mask, newest);
        if (missing == 1)
        {
            if (used[0] != 0) Scale(body, Fec.Inverse(Coefficient(used[0], Exponent(mask, newest, _missing[0]))));
            Keep(s, _missing[0], body);
            _rebuilt[(int)(_missing[0] % Fec.RingLen)] = _missing[0] + 1;
            return (long)_missing[0];
        }
        if (!Invert(used, missing, mask, newest)) return Unrecoverable;
        int w = 2 * missing;
        for (int j = 0; j < missing; j++)
        {
            Span<byte> o = _out[j].AsSpan(0, body.Length);
            o.Clear();
            for (int i = 0; i < missing; i++) Fec.MulXor(o, Row(i, missing, body), _matrix[j * w + missing + i], _products);
        }
        _out[0].AsSpan(0, body.Length).CopyTo(body);
        for (int j = 0; j < missing; j++)
        {
            Keep(s, _missing[j], j == 0 ? body : Spare(j - 1));
            _rebuilt[(int)(_missing[j] % Fec.RingLen)] = _missing[j] + 1;
        }
        SpareCount = missing - 1;
        for (int j = 1; j < missing; j++) SpareCounter[j - 1] = _missing[j];
        return (long)_missing[0];
    }

    private Span<byte> Row(int i, int count, Span<byte> last) => i == count - 1 ? last : _rows[i].AsSpan(0, last.Length);

    // Gauss-Jordan over GF(2^8) on [M | I], M[i][j] = g^(row_i·e_j) for the missing members j; the
    // inverse is left in the right half. A Vandermonde matrix (distinct g^e) is regular; one of rows
    // not starting at 0 may not be, and then nothing is rebuilt.
    private bool Invert(ReadOnlySpan<byte> rows, int n, ulong mask, ulong newest)
    {
        int w = 2 * n;
        Span<byte> a = _matrix.AsSpan(0, n * w);
        a.Clear();
        for (int i = 0; i < n; i++)
        {
            for (int j = 0; j < n; j++) a[i * w + j] = Coefficient(rows[i], Exponent(mask, newest, _missing[j]));
            a[i * w + n + i] = 1;
        }
        for (int col = 0; col < n; col++)
        {
            int pivot = col;
            while (pivot < n && a[pivot * w + col] == 0) pivot++;
            if (pivot == n) return false;
            if (pivot != col)
                for (int k = 0; k < w; k++) (a[col * w + k], a[pivot * w + k]) = (a[pivot * w + k], a[col * w + k]);
            byte inverse = Fec.Inverse(a[col * w + col]);
            for (int k = 0; k < w; k++) a[col * w + k] = Fec.Mul(a[col * w + k], inverse);
            for (int i = 0; i < n; i++)
            {
                byte f = a[i * w + col];
                if (i == col || f == 0) continue;
                for (int k = 0; k < w; k++) a[i * w + k] ^= Fec.Mul(f, a[col * w + k]);
            }
        }
        return true;
    }

    private void Fold(Span<byte> row, int r, ulong mask, ulong newest)
    {
        for (ulong bits = mask; bits != 0; bits &= bits - 1)
        {
            int i = System.Numerics.BitOperations.TrailingZeroCount(bits);
            ReadOnlySpan<byte> d = Held(newest - (ulong)i);
            if (d.IsEmpty) continue;
            if (d.Length > row.Length) d = d[..row.Length];        // a member longer than the body: a bad parity, caught by the IP check
            Fec.MulXor(row, d, Coefficient(r, Exponent(mask, newest, newest - (ulong)i)), _products);
        }
    }

    private static byte Coefficient(int row, int e) => Fec.Pow2(row * e);

    // The exponent e of the member with counter c: the members newer than it.
    private static int Exponent(ulong mask, ulong newest, ulong c) =>
        System.Numerics.BitOperations.PopCount(mask & ((1UL << (int)(newest - c)) - 1));

    private void Scale(Span<byte> body, byte c)
    {
        Fec.Products(c, _products);
        for (int i = 0; i < body.Length; i++) body[i] = _products[body[i]];
    }

}

// ==== 13. UDP socket =============================================================================
// IUdp is where datagrams enter and leave: UdpSocket (non-blocking; one AF_INET6 socket with
// IPV6_V6ONLY off when listening on a wildcard, so IPv4 and IPv6 peers share a port; a plain
// AF_INET or v6-only socket when bound to a specific address) or LoopbackUdp (in memory). Socket
// buffers are raised so bursts are not dropped by the kernel while the loop is busy. A batch goes out
// in one sendmmsg, and with UDP GSO (UDP_SEGMENT) records of one size to one peer go as one
// super-datagram; one recvmmsg fills a batch, and with UDP GRO a buffer may hold many datagrams of one
// sender, cut apart here. A kernel that refuses GSO at run time turns it off (OnOffloadOff).

internal sealed class PacketBatch
{
    internal readonly int Capacity, SlotLen;
    private readonly byte[] _mem;                    // pinned: slots can be handed to the kernel as is
    internal readonly int[] Offset, Length;
    internal readonly Endpoint[] Endpoints;
    // Per datagram, set only by the node's own messages (UdpOut): a TTL other than the socket's
    // (0: the socket's; a punch's priming datagram), and Alone: never part of a GSO run (a relayed
    // record may be longer than the path MTU, which the kernel then fragments).
    internal readonly byte[] Ttl;
    internal readonly bool[] Alone;
    internal int Count;

    internal PacketBatch(int capacity, int slotLen)
    {
        Capacity = capacity;
        SlotLen = slotLen;
        _mem = GC.AllocateUninitializedArray<byte>(capacity * slotLen, pinned: true);
        Offset = new int[capacity];
        Length = new int[capacity];
        Endpoints = new Endpoint[capacity];
        Ttl = new byte[capacity];
        Alone = new bool[capacity];
    }

    internal Span<byte> Slot(int i) => _mem.AsSpan(i * SlotLen, SlotLen);
    internal Span<byte> Packet(int i) => _mem.AsSpan(i * SlotLen + Offset[i], Length[i]);
    internal bool IsFull => Count == Capacity;
}

internal interface IUdp : IDisposable
{
    int Fd { get; }
    int LocalPort { get; }
    /// <summary>Receives one datagram; 0 when none is waiting.</summary>
    int Receive(Span<byte> buffer, out Endpoint from);
    bool Send(ReadOnlySpan<byte> datagram, in Endpoint to);

    /// <summary>Fills free slots of b (from b.Count on) with datagrams; returns how many it added.
    /// One datagram per call unless the socket does better.</summary>
    int ReceiveBatch(PacketBatch b)
    {
        int added = 0;
        while (b.Count < b.Capacity)
        {
            int n = Receive(b.Slot(b.Count), out b.Endpoints[b.Count]);
            if (n <= 0) break;
            b.Offset[b.Count] = 0;
            b.Length[b.Count] = n;
            b.Count++;
            added++;
        }
        return added;
    }

    /// <summary>Sends every slot of b with a length; returns how many the kernel refused.</summary>
    int SendBatch(PacketBatch b)
    {
        int refused = 0;
        for (int i = 0; i < b.Count; i++)
            if (b.Length[i] > 0 && !Send(b.Packet(i), b.Endpoints[i])) refused++;
        return refused;
    }
}

/// <summary>struct sock_filter: one classic BPF instruction.</summary>
[StructLayout(LayoutKind.Sequential)]
internal readonly record struct SockFilter(ushort Code, byte Jt, byte Jf, uint K);

/// <summary>struct sock_fprog: a program's length and its instructions.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct SockFprog
{
    internal ushort Len;
    internal nint Filter;
}

/// <summary>sendmsg/recvmsg structures with pointer-sized fields: one layout for 64- and 32-bit.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct MsgHdr
{
    internal nint Name;
    internal int NameLen;
    internal nint Iov;
    internal nuint IovLen;
    internal nint Control;
    internal nuint ControlLen;
    internal int Flags;
}

/// <summary>struct mmsghdr: a msghdr and the byte count the kernel fills in (padded to pointer size).</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct MMsgHdr
{
    internal MsgHdr Hdr;
    internal uint Len;
}

[StructLayout(LayoutKind.Sequential)]
internal struct IoVec
{
    internal nint Base;
    internal nuint Len;
}

internal sealed unsafe class UdpSocket : IUdp
{
    // The FORCE options pass net.core.rmem_max/wmem_max (we hold CAP_NET_ADMIN); without them the kernel
    // caps the plain options there, which is still better than the default.
    private const int SocketBufferLen = 4 << 20;
    private const int SOL_UDP = 17, UDP_SEGMENT = 103, UDP_GRO = 104;
    // One UDP_SEGMENT send: at most 64 segments (UDP_MAX_SEGMENTS of older kernels; newer allow more),
    // and the whole must fit one IP datagram (64 KiB less its headers).
    private const int MaxGsoSegments = 64, MaxGsoBytes = 65000, EIO = 5;
    private int _fd;
    private readonly bool _v6;
    public int Fd => _fd;
    public int LocalPort { get; }
    internal bool Gso, Gro;                            // kernel offloads in use (probed, dropped on refusal)
    internal Action<string>? OnOffloadOff;             // told once when the kernel refuses an offload
    // Receive: one recvmmsg fills up to RxMessages buffers; with GRO each may carry many datagrams
    // of one size (the last may be shorter). Datagrams not yet handed out wait here.
    // With GRO one buffer receives up to 64 KiB of coalesced datagrams, so each is sized for that.
    private const int RxMessages = 8, RxBufferLen = 65536, ControlLen = 64;
    private readonly byte[] _rx = GC.AllocateUninitializedArray<byte>(RxMessages * RxBufferLen, pinned: true);
    private readonly byte[] _rxNames = GC.AllocateArray<byte>(RxMessages * Libc.SockaddrIn6Len, pinned: true);
    private readonly byte[] _rxControl = GC.AllocateArray<byte>(RxMessages * ControlLen, pinned: true);
    private readonly MMsgHdr[] _rxMsgs = GC.AllocateArray<MMsgHdr>(RxMessages, pinned: true);
    private readonly IoVec[] _rxIov = GC.AllocateArray<IoVec>(RxMessages, pinned: true);
    private readonly int[] _rxSegment = new int[RxMessages];
    private readonly Endpoint[] _rxFrom = new Endpoint[RxMessages];
    private int _rxMsg, _rxMsgCount, _rxOffset;
    // Send: one sendmmsg per batch; a message is a GSO run or a single datagram.
    private readonly MMsgHdr[] _txMsgs = GC.AllocateArray<MMsgHdr>(Tune.BatchSize, pinned: true);
    private readonly IoVec[] _iov = GC.AllocateArray<IoVec>(Tune.BatchSize, pinned: true);
    private readonly byte[] _txNames = GC.AllocateArray<byte>(Tune.BatchSize * Libc.SockaddrIn6Len, pinned: true);
    private readonly byte[] _txControl = GC.AllocateArray<byte>(Tune.BatchSize * 32, pinned: true);
    private readonly int[] _txFirst = new int[Tune.BatchSize], _txEnd = new int[Tune.BatchSize];
    private readonly bool[] _txGso = new bool[Tune.BatchSize];

    private readonly IPAddress _bindAddress;
    private readonly bool _dualStack;

    private UdpSocket(int fd, IPAddress bindAddress, bool v6, bool dualStack, int port)
    {
        _fd = fd;
        _v6 = v6;
        _bindAddress = bindAddress;
        _dualStack = dualStack;
        LocalPort = port;
        int seg = 0, len = sizeof(int);
        Gso = Libc.GetSockOpt(fd, SOL_UDP, UDP_SEGMENT, &seg, &len) == 0;       // Linux 4.18+
        Gro = Libc.SetIntOpt(fd, SOL_UDP, UDP_GRO, 1) == 0;                      // Linux 5.0+
    }

    private static int CmsgHeaderLen => sizeof(nuint) + 8;                      // cmsg_len, cmsg_level, cmsg_type
    private static int CmsgAlign(int n) => (n + sizeof(nuint) - 1) & ~(sizeof(nuint) - 1);

    public int ReceiveBatch(PacketBatch b)
    {
        int added = 0;
        bool drained = false;   // a short recvmmsg emptied the queue: epoll (level-triggered) says when more comes
        while (b.Count < b.Capacity)
        {
            if (_rxMsg < _rxMsgCount)
            {
                int end = (int)_rxMsgs[_rxMsg].Len;
                if (_rxOffset >= end) { _rxMsg++; _rxOffset = 0; continue; }
                int n = Math.Min(_rxSegment[_rxMsg], end - _rxOffset);
                _rx.AsSpan(_rxMsg * RxBufferLen + _rxOffset, n).CopyTo(b.Slot(b.Count));
                _rxOffset += n;
                b.Offset[b.Count] = 0;
                b.Length[b.Count] = n;
                b.Endpoints[b.Count] = _rxFrom[_rxMsg];
                b.Count++;
                added++;
                continue;
            }
            if (drained || !ReceiveMessages()) break;
            drained = _rxMsgCount < RxMessages;
        }
        return added;
    }

    // One recvmmsg into the receive buffers; a UDP_GRO control message gives a buffer's datagram size.
    private bool ReceiveMessages()
    {
        _rxMsg = _rxMsgCount = _rxOffset = 0;
        fixed (byte* buf = _rx)
        fixed (byte* names = _rxNames)
        fixed (byte* control = _rxControl)
        fixed (IoVec* iov = _rxIov)
        fixed (MMsgHdr* msgs = _rxMsgs)
        {
            for (int i = 0; i < RxMessages; i++)
            {
                iov[i] = new IoVec { Base = (nint)(buf + i * RxBufferLen), Len = RxBufferLen };
                msgs[i] = new MMsgHdr
                {
                    Hdr = new MsgHdr
                    {
                        Name = (nint)(names + i * Libc.SockaddrIn6Len), NameLen = Libc.SockaddrIn6Len, Iov = (nint)(iov + i), IovLen = 1,
                        Control = (nint)(control + i * ControlLen), ControlLen = ControlLen,
                    },
                };
            }
            int got = Libc.RecvMMsg(_fd, msgs, RxMessages, 0, 0);
            if (got <= 0) return false;
            for (int i = 0; i < got; i++)
            {
                ref MMsgHdr m = ref msgs[i];
                int len = (int)m.Len;
                if (!Libc.TryReadSockaddr(new ReadOnlySpan<byte>(names + i * Libc.SockaddrIn6Len, Libc.SockaddrIn6Len), m.Hdr.NameLen, out _rxFrom[i])) m.Len = 0;
                int segment = len;
                byte* c = control + i * ControlLen;
                for (int off = 0; off + CmsgHeaderLen <= (int)m.Hdr.ControlLen;)
                {
                    nuint clen = *(nuint*)(c + off);
                    int level = *(int*)(c + off + sizeof(nuint)), type = *(int*)(c + off + sizeof(nuint) + 4);
                    if (clen < (nuint)CmsgHeaderLen) break;
                    if (level == SOL_UDP && type == UDP_GRO) segment = *(int*)(c + off + CmsgHeaderLen);
                    off += CmsgAlign((int)clen);
                }
                _rxSegment[i] = Math.Clamp(segment, 1, Math.Max(len, 1));
            }
            _rxMsgCount = got;
            return true;
        }
    }

    public int SendBatch(PacketBatch b)
    {
        if (b.Count > Tune.BatchSize) throw new ArgumentException("batch larger than Tune.BatchSize");
        int refused = 0, count = 0, iovUsed = 0;
        fixed (MMsgHdr* msgs = _txMsgs)
        fixed (IoVec* iov = _iov)
        fixed (byte* names = _txNames)
        fixed (byte* control = _txControl)
        {
            for (int i = 0; i < b.Count;)
            {
                if (b.Length[i] == 0) { i++; continue; }
                if (!_v6 && !b.Endpoints[i].IsV4) { refused++; i++; continue; }   // an IPv4-only socket cannot reach it
                // A GSO run: datagrams to one endpoint, all of one size but the last (which may be shorter).
                int seg = b.Length[i], total = 0, n = 0, j = i;
                // A TTL is one cmsg for the whole send, so a datagram with its own goes by itself, as do Alone ones.
                bool alone = b.Alone[i] || b.Ttl[i] != 0;
                for (; j < b.Count && n < MaxGsoSegments; j++)
                {
                    int len = b.Length[j];
                    if (len == 0) continue;
                    if (n > 0 && (alone || !Gso || b.Alone[j] || b.Ttl[j] != 0)) break;
                    if (!b.Endpoints[j].Equals(b.Endpoints[i]) || len > seg || total + len > MaxGsoBytes) break;
                    n++;
                    total += len;
                    // Only the last GSO segment may be shorter than the first: a shorter one ends the run.
                    if (len < seg) { j++; break; }
                }
                byte* name = names + count * Libc.SockaddrIn6Len;
                int nameLen = Libc.WriteSockaddr(b.Endpoints[i], _v6, new Span<byte>(name, Libc.SockaddrIn6Len));
                int firstIov = iovUsed;
                for (int k = i; k < j; k++)
                    if (b.Length[k] > 0)
                        fixed (byte* p = b.Packet(k)) iov[iovUsed++] = new IoVec { Base = (nint)p, Len = (nuint)b.Length[k] };   // slots are pinned
                byte* c = control + count * 32;
                int controlLen = 0;
                if (n > 1 || b.Ttl[i] != 0)
                {
                    new Span<byte>(c, 32).Clear();
                    bool v4 = b.Endpoints[i].IsV4;
                    int level = n > 1 ? SOL_UDP : v4 ? Libc.IPPROTO_IP : Libc.IPPROTO_IPV6;
                    int type = n > 1 ? UDP_SEGMENT : v4 ? Libc.IP_TTL : Libc.IPV6_HOPLIMIT;
                    int valueLen = n > 1 ? sizeof(ushort) : sizeof(int);
                    *(nuint*)c = (nuint)(CmsgHeaderLen + valueLen);
                    *(int*)(c + sizeof(nuint)) = level;
                    *(int*)(c + sizeof(nuint) + 4) = type;
                    if (n > 1) *(ushort*)(c + CmsgHeaderLen) = (ushort)seg;
                    else *(int*)(c + CmsgHeaderLen) = b.Ttl[i];
                    controlLen = CmsgAlign(CmsgHeaderLen + valueLen);
                }
                msgs[count] = new MMsgHdr
                {
                    Hdr = new MsgHdr
                    {
                        Name = (nint)name, NameLen = nameLen, Iov = (nint)(iov + firstIov), IovLen = (nuint)(iovUsed - firstIov),
                        Control = controlLen > 0 ? (nint)c : 0, ControlLen = (nuint)controlLen,
                    },
                };
                _txFirst[count] = i;
                _txEnd[count] = j;
                _txGso[count] = n > 1;
                count++;
                i = j;
            }
            for (int done = 0; done < count;)
            {
                int sent = Libc.SendMMsg(_fd, msgs + done, (uint)(count - done), 0);
                if (sent > 0) { done += sent; continue; }
                int e = Libc.Errno;
                if (e == Libc.EINTR) continue;
                if (_txGso[done] && e != Libc.EAGAIN)
                {
                    // EIO: no checksum offload on the route; EINVAL: no GSO here. Resend this run singly.
                    Gso = false;
                    OnOffloadOff?.Invoke($"udp_segment error=\"{Libc.ErrorText(e)}\"");
                    for (int k = _txFirst[done]; k < _txEnd[done]; k++)
                        if (b.Length[k] > 0 && !Send(b.Packet(k), b.Endpoints[k])) refused++;
                    done++;
                    continue;
                }
                // Full socket buffer (or a refused destination): this message is lost; go on with the rest.
                for (int k = _txFirst[done]; k < _txEnd[done]; k++) if (b.Length[k] > 0) refused++;
                done++;
            }
        }
        return refused;
    }

    /// <summary>reusePort: the first socket of a group that Sibling adds to (one per worker; the
    /// kernel picks a socket per datagram by its addresses and ports, so a peer stays on one).</summary>
    internal static uint FwMark;                          // --exit-node: set before the sockets open, and on a switch

    internal void SetMark(uint mark) => Libc.SetIntOpt(_fd, Libc.SOL_SOCKET, Libc.SO_MARK, (int)mark);

    internal static UdpSocket Bind(IPAddress address, int port, bool reusePort = false)
    {
        // A port in use must fail as it does without workers, not quietly join another process's
        // group (same user) and split the peers with it: a plain bind first says whether it is free.
        if (reusePort && port != 0) Bind(address, port).Dispose();
        bool wildcard4 = address.Equals(IPAddress.Any), v6 = address.AddressFamily == AddressFamily.InterNetworkV6;
        if (wildcard4)
        {
            // Dual-stack where the host has IPv6; plain IPv4 where it does not.
            try { return Open(IPAddress.IPv6Any, port, true, dualStack: true, reusePort); }
            catch (IOException) { return Open(IPAddress.Any, port, false, dualStack: false, reusePort); }
        }
        return Open(address, port, v6, dualStack: false, reusePort);
    }

    internal void DropOffloads()
    {
        Gso = false;
        if (Gro && Libc.SetIntOpt(_fd, SOL_UDP, UDP_GRO, 0) == 0) Gro = false;
    }

    /// <summary>Another socket on this one's address and port (both bound with reusePort).</summary>
    internal UdpSocket Sibling() => Open(_bindAddress, LocalPort, _v6, _dualStack, reusePort: true);

    /// <summary>The classic BPF program the kernel runs to pick a socket of the port's reuseport group
    /// for each datagram (SO_ATTACH_REUSEPORT_CBPF; it sees the UDP payload at 0, the IP header at
    /// SKF_NET_OFF, and returns an index in the order the sockets were bound). Handshake messages
    /// (content type 0x16) go to the last socket, the handshake queue; everything else goes to one of
    /// the workers' sockets by the source address and port, so one flow keeps to one worker. So a
    /// flood of hellos fills a queue of its own and never crowds records out of the workers'.</summary>
    internal static SockFilter[] HandshakeSteering(int workers)
    {
        const ushort LdB = 0x30, LdH = 0x28, LdW = 0x20, RshK = 0x74, ModK = 0x94, AddX = 0x0c, Tax = 0x07, JeqK = 0x15, Ja = 0x05, RetK = 0x06, RetA = 0x16;
        const uint NetOff = 0xFFF00000;                        // SKF_NET_OFF: offsets from the IP header
        return
        [
            new(LdB, 0, 0, 0),                                 // A = first payload byte
            new(JeqK, 13, 0, Spec.TlsHandshake),               // a handshake: to the handshake queue
            new(LdB, 0, 0, NetOff),                            // A = IP version
            new(RshK, 0, 0, 4),
            new(JeqK, 4, 0, 6),
            new(LdW, 0, 0, NetOff + 12),                       // IPv4: source address + source port
            new(Tax, 0, 0, 0),                                 // (options would move the port: only the spread changes)
            new(LdH, 0, 0, NetOff + 20),
            new(Ja, 0, 0, 3),
            new(LdW, 0, 0, NetOff + 20),                       // IPv6: the address's last 32 bits + source port
            new(Tax, 0, 0, 0),
            new(LdH, 0, 0, NetOff + 40),
            new(AddX, 0, 0, 0),
            new(ModK, 0, 0, (uint)workers),
            new(RetA, 0, 0, 0),
            new(RetK, 0, 0, (uint)workers),
        ];
    }

    /// <summary>Installs HandshakeSteering for the reuseport group this socket belongs to (workers
    /// sockets bound first, then the handshake queue); false when the kernel refuses it.</summary>
    internal bool SteerHandshakes(int workers)
    {
        SockFilter[] prog = HandshakeSteering(workers);
        fixed (SockFilter* f = prog)
        {
            var fprog = new SockFprog { Len = (ushort)prog.Length, Filter = (nint)f };
            return Libc.SetSockOpt(_fd, Libc.SOL_SOCKET, Libc.SO_ATTACH_REUSEPORT_CBPF, &fprog, sizeof(SockFprog)) == 0;
        }
    }

    private static UdpSocket Open(IPAddress address, int port, bool v6, bool dualStack, bool reusePort)
    {
        int fd = Libc.Socket(v6 ? Libc.AF_INET6 : Libc.AF_INET, Libc.SOCK_DGRAM | Libc.SOCK_NONBLOCK | Libc.SOCK_CLOEXEC, 0);
        if (fd < 0) throw new IOException($"cannot create UDP socket: {Libc.ErrorText(Libc.Errno)}");
        // Set either way: the default comes from net.ipv6.bindv6only, which a distribution may have changed.
        if (v6) Libc.SetIntOpt(fd, Libc.IPPROTO_IPV6, Libc.IPV6_V6ONLY, dualStack ? 0 : 1);
        if (FwMark != 0 && Libc.SetIntOpt(fd, Libc.SOL_SOCKET, Libc.SO_MARK, (int)FwMark) < 0)
        {
            int e = Libc.Errno;
            Libc.Close(fd);
            throw new IOException($"cannot mark the UDP socket for --exit-node (SO_MARK): {Libc.ErrorText(e)}");
        }
        if (reusePort && Libc.SetIntOpt(fd, Libc.SOL_SOCKET, Libc.SO_REUSEPORT, 1) < 0)
        {
            int e = Libc.Errno;
            Libc.Close(fd);
            throw new IOException($"cannot share {address}:{port} between workers (SO_REUSEPORT): {Libc.ErrorText(e)}");
        }
        foreach (int opt in new[] { Libc.SO_RCVBUFFORCE, Libc.SO_SNDBUFFORCE })
            if (Libc.SetIntOpt(fd, Libc.SOL_SOCKET, opt, SocketBufferLen) < 0)
                Libc.SetIntOpt(fd, Libc.SOL_SOCKET, opt == Libc.SO_RCVBUFFORCE ? Libc.SO_RCVBUF : Libc.SO_SNDBUF, SocketBufferLen);
        Span<byte> sa = stackalloc byte[Libc.SockaddrIn6Len];
        int len = Libc.WriteSockaddr(Endpoint.FromIp(address, port), v6, sa);
        fixed (byte* p = sa)
        {
            if (Libc.Bind(fd, p, len) < 0)
            {
                int e = Libc.Errno;
                Libc.Close(fd);
                throw new IOException($"cannot listen on {address}:{port}: {Libc.ErrorText(e)}" + (e == Libc.EADDRINUSE ? " (another process uses the port)" : ""));
            }
            int alen = sa.Length;
            Libc.GetSockName(fd, p, &alen);
            Libc.TryReadSockaddr(sa, alen, out Endpoint bound);
            return new UdpSocket(fd, address, v6, dualStack, bound.Port);
        }
    }

    public int Receive(Span<byte> buffer, out Endpoint from)
    {
        from = default;
        Span<byte> sa = stackalloc byte[Libc.SockaddrIn6Len];
        int alen = sa.Length;
        nint n;
        fixed (byte* b = buffer)
        fixed (byte* p = sa)
            n = Libc.RecvFrom(_fd, b, (nuint)buffer.Length, 0, p, &alen);
        if (n < 0) return 0;
        return Libc.TryReadSockaddr(sa, alen, out from) ? (int)n : 0;
    }

    public bool Send(ReadOnlySpan<byte> datagram, in Endpoint to)
    {
        if (!_v6 && !to.IsV4) return false;            // an IPv4-only socket cannot reach an IPv6 peer
        Span<byte> sa = stackalloc byte[Libc.SockaddrIn6Len];
        int len = Libc.WriteSockaddr(to, _v6, sa);
        fixed (byte* b = datagram)
        fixed (byte* p = sa)
            return Libc.SendTo(_fd, b, (nuint)datagram.Length, 0, p, len) == datagram.Length;
    }

    public void Dispose()
    {
        if (_fd >= 0) Libc.Close(_fd);
        _fd = -1;
    }
}

/// <summary>An in-memory network: each LoopbackUdp has an endpoint; Send delivers to the owner of `to`.</summary>
internal sealed class LoopbackNet
{
    internal readonly Dictionary<Endpoint, LoopbackUdp> Hosts = new();
    internal Func<Endpoint, Endpoint, byte[], bool>? Filter;   // (from, to, datagram) -> deliver?
}

internal sealed class LoopbackUdp : IUdp
{
    private readonly LoopbackNet _net;
    internal Endpoint Self;
    private readonly Queue<(byte[] Data, Endpoint From)> _inbox = new();
    internal readonly List<byte[]> Sent = new();
    public int Fd => -1;
    public int LocalPort => Self.Port;

    internal LoopbackUdp(LoopbackNet net, Endpoint self) { _net = net; Self = self; net.Hosts[self] = this; }

    internal void Deliver(byte[] data, in Endpoint from) => _inbox.Enqueue((data, from));
    internal int Pending => _inbox.Count;

    public int Receive(Span<byte> buffer, out Endpoint from)
    {
        from = default;
        if (!_inbox.TryDequeue(out var d)) return 0;
        d.Data.CopyTo(buffer);
        from = d.From;
        return d.Data.Length;
    }

    public bool Send(ReadOnlySpan<byte> datagram, in Endpoint to)
    {
        byte[] copy = datagram.ToArray();
        Sent.Add(copy);
        if (_net.Filter != null && !_net.Filter(Self, to, copy)) return true;
        if (_net.Hosts.TryGetValue(to, out LoopbackUdp? dst)) dst.Deliver(copy, Self);
        return true;
    }

    public void Dispose() => _net.Hosts.Remove(Self);
}

/// <summary>--listen-tcp and --peer-tcp: the same datagrams over TCP, for networks that block UDP.
/// Each datagram already begins with a TLS-looking preamble whose length frames it, so a stream is
/// datagrams back to back and nothing else. A connection stands in for an endpoint: an address in
/// 100::/64 (RFC 6666's discard-only prefix, which no peer can have) with its slot, and a
/// generation as the port, so the node seals, opens, admits and roams records over it exactly as
/// over UDP; Worker.FlushUdp hands the slots addressed to one to Send. Everything runs on the
/// loop's thread or under the node's lock, and nothing blocks: sockets are non-blocking, output
/// waits in a bounded buffer (what does not fit is dropped and counted, as a full UDP socket
/// would), a frame longer than a record is malformed and ends its connection, and a connection
/// that brings no authenticated record for IdleCloseMs is closed (the node says which do: Touch).
/// When the table is full, the oldest connection that never brought one makes room, so clients that
/// only hold connections open cannot lock members out.</summary>
internal sealed unsafe class TcpLinks : IDisposable
{
    internal const int MaxConnections = 64, OutLimitLen = 128 * 1024;
    private const long IdleCloseMs = 30_000, ConnectTimeoutMs = 5_000;
    private const int IPPROTO_TCP = 6, TCP_NODELAY = 1, SO_ERROR = 4, SO_KEEPALIVE = 9, EINPROGRESS = 115;
    // 100::/64 is the discard-only prefix (RFC 6666): a TCP link's stand-in endpoint cannot be a real
    // UDP address, so the node can keep one Endpoint type for both.
    private static readonly UInt128 Prefix = (UInt128)0x0100 << 112;

    private sealed class Conn
    {
        internal int Fd;
        internal ushort Generation;
        internal bool Outbound, Connecting;
        internal Endpoint Remote;
        internal readonly byte[] In = new byte[Tune.SlotLen];
        internal int InLen;
        internal byte[] Out = new byte[OutLimitLen];
        internal int OutStart, OutLen;
        internal long LastRxMs, OpenedMs;                // LastRxMs: the last authenticated record (Touch)
        internal bool Authenticated;
    }

    private readonly Conn?[] _slots = new Conn?[MaxConnections];
    private readonly Dictionary<int, int> _byFd = new();
    private readonly int _epfd;
    private int _listenFd = -1;
    private ushort _generation;
    internal int ListenPort;
    internal long Accepted, Refused, Closed, Malformed, DroppedFull;

    internal TcpLinks(int epfd) { _epfd = epfd; }

    internal static bool IsTcp(in Endpoint e) => (e.Address >> 64) == (Prefix >> 64);
    private static Endpoint Pseudo(int slot, ushort generation) => new() { Address = Prefix | (uint)slot, Port = generation };

    internal int Count { get { int n = 0; foreach (Conn? c in _slots) if (c != null) n++; return n; } }

    /// <summary>The endpoints that stand for the open links.</summary>
    internal List<Endpoint> Links()
    {
        var links = new List<Endpoint>();
        for (int i = 0; i < MaxConnections; i++) if (_slots[i] is Conn c) links.Add(Pseudo(i, c.Generation));
        return links;
    }

    /// <summary>The address and port at the other end of a connection endpoint, for status.</summary>
    internal Endpoint RemoteOf(in Endpoint e) => Find(e) is Conn c ? c.Remote : default;

    internal void Listen(IPAddress address, int port)
    {
        (_listenFd, ListenPort) = Libc.ListenTcp(address, port, 64, "listen on TCP", " (--listen-tcp)");
        Libc.EpollAdd(_epfd, _listenFd);
    }

    internal bool Owns(int fd) => fd == _listenFd || _byFd.ContainsKey(fd);

    /// <summary>Starts a connection to remote (non-blocking); the endpoint that stands for it, or
    /// unset when there is no room or the socket cannot be made.</summary>
    internal Endpoint Connect(in Endpoint remote, long nowMs)
    {
        int slot = Array.IndexOf(_slots, null);
        if (slot < 0) { Refused++; return default; }
        bool v6 = !remote.IsV4;
        int fd = Libc.Socket(v6 ? Libc.AF_INET6 : Libc.AF_INET, Libc.SOCK_STREAM | Libc.SOCK_NONBLOCK | Libc.SOCK_CLOEXEC, 0);
        if (fd < 0) return default;
        if (UdpSocket.FwMark != 0) Libc.SetIntOpt(fd, Libc.SOL_SOCKET, Libc.SO_MARK, (int)UdpSocket.FwMark);   // --exit-node: not through itself
        Span<byte> sa = stackalloc byte[Libc.SockaddrIn6Len];
        int len = Libc.WriteSockaddr(remote, v6, sa);
        int rc;
        fixed (byte* p = sa) rc = Libc.Connect(fd, p, len);
        if (rc < 0 && Libc.Errno != EINPROGRESS) { Libc.Close(fd); return default; }
        Conn c = Add(slot, fd, remote, nowMs);
        c.Outbound = true;
        c.Connecting = rc < 0;
        Libc.EpollMod(_epfd, fd, Libc.EPOLLIN | Libc.EPOLLOUT);
        return Pseudo(slot, c.Generation);
    }

    private Conn Add(int slot, int fd, in Endpoint remote, long nowMs)
    {
        Libc.SetIntOpt(fd, IPPROTO_TCP, TCP_NODELAY, 1);          // records are small and time-critical
        Libc.SetIntOpt(fd, Libc.SOL_SOCKET, SO_KEEPALIVE, 1);
        var c = new Conn { Fd = fd, Remote = remote, LastRxMs = nowMs, OpenedMs = nowMs, Generation = ++_generation == 0 ? ++_generation : _generation };
        _slots[slot] = c;
        _byFd[fd] = slot;
        Libc.EpollAdd(_epfd, fd);
        return c;
    }

    private Conn? Find(in Endpoint e)
    {
        if (!IsTcp(e)) return null;
        ulong slot = (ulong)(e.Address & 0xFFFF_FFFF);
        return slot < MaxConnections && _slots[slot] is Conn c && c.Generation == e.Port ? c : null;
    }

    /// <summary>A record that came over the link `from` authenticated: it is a member's, and stays.</summary>
    internal void Touch(in Endpoint from, long nowMs)
    {
        if (Find(from) is not Conn c) return;
        c.LastRxMs = nowMs;
        c.Authenticated = true;
    }

    /// <summary>Queues one datagram on the connection `to` stands for; false (counted) when the
    /// connection is gone or its buffer is full.</summary>
    internal bool Send(in Endpoint to, ReadOnlySpan<byte> datagram)
    {
        if (Find(to) is not Conn c) return false;
        if (c.OutLen + datagram.Length > c.Out.Length - c.OutStart)
        {
            Buffer.BlockCopy(c.Out, c.OutStart, c.Out, 0, c.OutLen);   // compact before giving up
            c.OutStart = 0;
            if (c.OutLen + datagram.Length > c.Out.Length) { DroppedFull++; return false; }
        }
        datagram.CopyTo(c.Out.AsSpan(c.OutStart + c.OutLen));
        c.OutLen += datagram.Length;
        if (!c.Connecting) Flush(c);
        return true;
    }

    private void Flush(Conn c)
    {
        while (c.OutLen > 0)
        {
            nint n;
            fixed (byte* p = &c.Out[c.OutStart]) n = Libc.Write(c.Fd, p, (nuint)c.OutLen);
            if (n < 0)
            {
                if (Libc.Errno is Libc.EAGAIN or Libc.EINTR) break;
                Close(c, "write_failed");
                return;
            }
            c.OutStart += (int)n;
            c.OutLen -= (int)n;
        }
        if (c.OutLen == 0) c.OutStart = 0;
        Libc.EpollMod(_epfd, c.Fd, c.OutLen > 0 ? Libc.EPOLLIN | Libc.EPOLLOUT : Libc.EPOLLIN);
    }

    /// <summary>Works off what epoll reported on fd: new connections, a finished connect, queued
    /// output, and every complete datagram read, handed to deliver with the endpoint it came from.</summary>
    internal void OnReady(int fd, long nowMs, Action<ReadOnlySpan<byte>, Endpoint> deliver)
    {
        if (fd == _listenFd) { AcceptAll(nowMs); return; }
        if (!_byFd.TryGetValue(fd, out int slot) || _slots[slot] is not Conn c) return;
        if (c.Connecting)
        {
            int err = 0, len = sizeof(int);
            Libc.GetSockOpt(fd, Libc.SOL_SOCKET, SO_ERROR, &err, &len);
            if (err == EINPROGRESS) return;
            if (err != 0) { Close(c, "connect_failed"); return; }
            c.Connecting = false;
        }
        Flush(c);
        if (_slots[slot] != c) return;
        for (int round = 0; round < 64; round++)
        {
            nint n;
            fixed (byte* p = &c.In[c.InLen]) n = Libc.Read(fd, p, (nuint)(c.In.Length - c.InLen));
            if (n == 0) { Close(c, "closed_by_peer"); return; }
            if (n < 0) { if (Libc.Errno is not (Libc.EAGAIN or Libc.EINTR)) Close(c, "read_failed"); return; }
            c.InLen += (int)n;
            int at = 0;
            while (c.InLen - at >= Spec.PreambleLen)
            {
                ReadOnlySpan<byte> head = c.In.AsSpan(at);
                int frameLen = Spec.PreambleLen + BinaryPrimitives.ReadUInt16BigEndian(head[3..]);
                if (head[1] != 0x03 || head[2] != 0x03 || frameLen > c.In.Length)
                {
                    Malformed++;
                    Close(c, "malformed_frame");
                    return;
                }
                if (c.InLen - at < frameLen) break;
                deliver(c.In.AsSpan(at, frameLen), Pseudo(slot, c.Generation));
                if (_slots[slot] != c) return;                     // closed while delivering
                at += frameLen;
            }
            Buffer.BlockCopy(c.In, at, c.In, 0, c.InLen - at);
            c.InLen -= at;
        }
    }

    private void AcceptAll(long nowMs)
    {
        Span<byte> sa = stackalloc byte[Libc.SockaddrIn6Len];
        for (int i = 0; i < 16; i++)
        {
            int len = sa.Length, fd;
            fixed (byte* p = sa) fd = Libc.Accept4(_listenFd, p, &len, Libc.SOCK_NONBLOCK | Libc.SOCK_CLOEXEC);
            if (fd < 0) return;
            Libc.TryReadSockaddr(sa, len, out Endpoint remote);
            int slot = Array.IndexOf(_slots, null);
            if (slot < 0 && OldestStranger() is Conn stranger) { slot = _byFd[stranger.Fd]; Close(stranger, "evicted"); }
            if (slot < 0) { Refused++; Libc.Close(fd); continue; }    // all members: the newest is turned away
            Add(slot, fd, remote, nowMs);
            Accepted++;
        }
    }

    private Conn? OldestStranger()
    {
        Conn? oldest = null;
        foreach (Conn? c in _slots)
            if (c is { Authenticated: false, Outbound: false } && (oldest == null || c.OpenedMs < oldest.OpenedMs)) oldest = c;
        return oldest;
    }

    /// <summary>Closes connections that brought no authenticated record for IdleCloseMs (a connect: ConnectTimeoutMs);
    /// returns the endpoints that went away, for the node to forget.</summary>
    internal void Expire(long nowMs, List<Endpoint> gone)
    {
        for (int i = 0; i < MaxConnections; i++)
            if (_slots[i] is Conn c && nowMs - c.LastRxMs >= (c.Connecting ? ConnectTimeoutMs : IdleCloseMs)) Close(c, c.Connecting ? "connect_timeout" : "idle");
        gone.AddRange(_gone);
        _gone.Clear();
    }

    private readonly List<Endpoint> _gone = new();

    private void Close(Conn c, string why)
    {
        if (!_byFd.Remove(c.Fd, out int slot)) return;
        _slots[slot] = null;
        Libc.Close(c.Fd);
        Closed++;
        _gone.Add(Pseudo(slot, c.Generation));
        LastCloseReason = why;
    }

    internal string LastCloseReason = "";

    public void Dispose()
    {
        foreach (Conn? c in _slots) if (c != null) Close(c, "shutdown");
        if (_listenFd >= 0) Libc.Close(_listenFd);
        _listenFd = -1;
    }
}

// ==== 14. Event loop & node ======================================================================
// Node is the protocol core: it takes batches of packets and the time, and returns batches of
// packets; its only I/O is the datagrams it makes itself (UdpOut, flushed through its Sink) and log
// lines (queued by the daemon's Log). Its two pipelines:
//   ProcessTunBatch: TUN packet -> route lookup (destination) -> peer -> session -> Record.Seal -> UDP
//   ProcessUdpBatch: datagram -> Classify -> Record.Open -> replay check -> source check -> TUN
// Both work in place: a TUN packet is read into its slot at Record.PayloadOffset and sealed there, so
// the slot then holds the datagram; a datagram is opened where it lies and the slot then holds the
// IP packet. Messages the node makes itself (handshakes, keepalives, staged packets) go to UdpOut.
// Worker moves bytes between the batches and an IDataplane / IUdp pair; Daemon runs the epoll loop,
// the timers, signals and the control socket around the first Worker. With --workers N > 1 each
// further Worker has a thread, a TUN queue and a socket of its own; whoever works on the node holds
// its lock, so the node is single-threaded code either way. Node is a partial class: its timers are
// in §9, its membership and route election in §15, its paths (relay, punching) in §16, its side of
// joins in §19, each beside the rest of its story; this section keeps its peers, the two pipelines
// and the messages it makes. Daemon is partial the same way: the state file and revocations in §15,
// beacons and port mapping in §16, writing joiners in §19.

internal interface IPacketSink
{
    /// <summary>Sends and empties a batch of datagrams (called when UdpOut fills mid-batch).</summary>
    void FlushUdp(PacketBatch batch);
}

/// <summary>One row of the route table: who carries a prefix, and why.</summary>
internal readonly record struct RouteEntry(IpPrefix Prefix, int PeerId, int Metric, bool Claim, int Rank);

/// <summary>A public key as a dictionary key.</summary>
internal readonly record struct KeyId(UInt128 A, UInt128 B)
{
    internal static KeyId Of(ReadOnlySpan<byte> k) =>
        new(BinaryPrimitives.ReadUInt128LittleEndian(k), BinaryPrimitives.ReadUInt128LittleEndian(k[16..]));

    internal Key32 Key()
    {
        Key32 k = default;
        BinaryPrimitives.WriteUInt128LittleEndian(k, A);
        BinaryPrimitives.WriteUInt128LittleEndian(((Span<byte>)k)[16..], B);
        return k;
    }
}

internal sealed partial class Node
{
    internal readonly Log Log;
    internal readonly Counters Counters;
    internal readonly Handshaker Handshaker;
    internal readonly List<Peer> Peers = new();
    internal long StagedBytes;                   // what all peers' staging rings hold (Peer.Stage)
    private readonly Dictionary<KeyId, Peer> _byKey = new();
    internal RouteTrie Routes = new();           // rebuilt whole by RebuildRoutes when a route changes
    internal List<RouteEntry> RouteList = new();
    internal long RoutesVersion;                 // the daemon syncs kernel routes when this moves
    internal readonly Mesh Mesh;
    internal readonly IndexTable Indexes = new();
    internal readonly PacketBatch UdpOut = new(Tune.BatchSize, Tune.SlotLen);
    internal IPacketSink? Sink;
    internal readonly Lock Gate = new();         // whoever works on the node holds it (Worker, Daemon)
    internal readonly LoopSignal Signal = new();
    private Func<long, long> _jitter = max => Random.Shared.NextInt64(max + 1);

    /// <summary>The peers' timer jitter (Peer.Jitter); tests fix it to check exact deadlines.</summary>
    internal Func<long, long> Jitter
    {
        get => _jitter;
        set { _jitter = value; foreach (Peer p in Peers) p.Jitter = value; }
    }
    internal readonly int Mtu;                   // the largest payload: the device's MTU, and a frame's header with --mode tap|hub
    internal readonly L2Mode Mode;
    internal readonly MacTable Macs = new();     // --mode tap|hub (§8.1)
    internal ulong LocalMac;                     // the TAP's own: no peer may source it
    internal long FramesSwitched, FramesFlooded, FramesUnknown;
    internal Func<long> UnixNs = () => (DateTime.UtcNow - DateTime.UnixEpoch).Ticks * 100;
    private long _lastUnixNs;
    private readonly HelloState _hello = new();
    // Peers by the ephemeral key of the hello we answered last (a slot per its first byte): a repeat
    // is found before any Diffie-Hellman. A slot another hello took only costs that one DH.
    internal readonly Peer?[] AnsweredBy = new Peer?[256];

    internal Node(UpConfig cfg, Log log, Counters counters)
    {
        Log = log;
        Counters = counters;
        Mode = cfg.Mode;
        Mtu = cfg.Mtu + (Mode != L2Mode.Tun ? Ethernet.MaxHeaderLen : 0);
        RekeyAfterMs = cfg.RekeyAfterTimeMs;
        ConfigurePolicy(cfg);
        Admission = new Admission(cfg.HandshakeRate, cfg.HandshakeRatePerSource, cfg.MaxSessions);
        Handshaker = new Handshaker(cfg.PrivateKey, FindOrAdmitPeer);
        if (cfg.Cipher != "auto") Handshaker.ChooseCipher(cfg.Cipher);
        _psk = cfg.Psk;
        Handshaker.AcceptPsks = (Key32[])cfg.AcceptPsks.Clone();
        _keepaliveMs = cfg.PersistentKeepaliveMs;
        FecAuto = cfg.Fec;
        Mesh = new Mesh(this);
        Mesh.Configure(cfg);
        Relays.Configure(cfg);
        foreach (PeerConfig pc in cfg.Peers) AddPeer(pc, _psk, cfg.PersistentKeepaliveMs);
        RebuildRoutes();
    }

    internal bool Isolate;                       // --isolate: no peer reaches another through us
    internal bool AnyIsolated;                   // some configured peer is marked isolated
    internal List<string>? ExitFor;              // --exit-for: the members our exit serves (null: all)
    private long _exitForVersion;
    private IpPrefix[] _exitLocal = [];          // with --exit-for: what a member not served may still reach
    internal PacketFilter? Filter;               // --filter: null without rules
    private Key32 _psk;                          // the network secret, for peers added by a reload or learned
    private long _keepaliveMs;                   // --keepalive, for learned members
    private long _admitNowMs;                    // the time of the ClientHello FindOrAdmitPeer is asked about

    /// <summary>With --exit-for: p is not among the members our exit serves. Judged again only when
    /// the rules or p's name change, so the packet path asks without allocating.</summary>
    internal bool ExitRefused(Peer p)
    {
        if (ExitFor == null) return false;
        if (p.ExitForVersion != _exitForVersion || !ReferenceEquals(p.ExitForName, p.Name))
        {
            string key = p.PublicKey.ToBase64();
            // A name pattern judges only names our config gives: a member names itself otherwise.
            p.ExitRefusedCached = !ExitFor.Exists(x => x == key || p.NamedByConfig && PacketFilter.Glob(x, p.Name));
            p.ExitForVersion = _exitForVersion;
            p.ExitForName = p.Name;
        }
        return p.ExitRefusedCached;
    }

    // What a member our exit does not serve sends past our own routes: only our addresses, our
    // claims and the overlay networks are for it; the rest would leave by the uplink.
    private bool ForTheExit(ReadOnlySpan<byte> packet)
    {
        ReadOnlySpan<byte> dst = Ip.Version(packet) == 4 ? packet.Slice(Ip.V4DestinationOffset, 4) : packet.Slice(Ip.V6DestinationOffset, 16);
        foreach (IpPrefix local in _exitLocal)
            if (local.IsV6 == (dst.Length == 16) && local.Contains(dst)) return false;
        return RouteOf(packet, destination: true) < 0;
    }

    // What the packet path checks beyond routes: isolation and the filter (reloadable).
    private void ConfigurePolicy(UpConfig cfg)
    {
        Isolate = cfg.Isolate;
        AnyIsolated = cfg.Peers.Exists(pc => pc.Isolated);
        if (cfg.ExitFor.Count == 0) ExitFor = null;
        else if (ExitFor == null || string.Join(' ', ExitFor) != string.Join(' ', cfg.ExitFor)) { ExitFor = new List<string>(cfg.ExitFor); _exitForVersion++; }
        var local = new List<IpPrefix>(cfg.Networks);
        foreach (IfAddress a in cfg.Addresses) local.Add(a.Host);
        local.AddRange(cfg.Claims);
        _exitLocal = local.ToArray();
        // The same rules keep their flows and counters; other rules start a table of their own.
        if (cfg.Filters.Count == 0) Filter = null;
        else if (Filter == null || !Filter.Same(cfg.Filters)) Filter = new PacketFilter(cfg.Filters.ConvertAll(PacketFilter.Parse));
    }

    internal void ClearKeys()
    {
        foreach (Peer p in Peers) { p.Psk.Clear(); p.StaticShared.Clear(); }
        Handshaker.PrivateKey.Clear();
        _psk.Clear();
        SetAcceptPsks([]);
    }

    private void SetAcceptPsks(Key32[] psks)
    {
        for (int i = 0; i < Handshaker.AcceptPsks.Length; i++) Handshaker.AcceptPsks[i].Clear();
        Handshaker.AcceptPsks = (Key32[])psks.Clone();
    }

    internal readonly Admission Admission;
    internal readonly Relays Relays = new();
    internal long RekeyAfterMs;

    internal Peer? FindPeer(in Key32 key) => _byKey.TryGetValue(KeyId.Of(key), out Peer? p) ? p : null;

    // The responder's question "who is this key?". Under --mesh an unknown key becomes a provisional
    // member: the handshake cannot complete without the network secret (psk2 is mixed into the keys
    // the Bind must use), and provisional members are few and short-lived (ForgetAtMs).
    private Peer? FindOrAdmitPeer(Key32 key)
    {
        if (Mesh.IsRevoked(key)) { Mesh.RefusedRevoked(key); return null; }
        if (Mesh.Refuses(key)) { Mesh.RefusedIsolated(key); return null; }
        Peer? p = FindPeer(key);
        if (p != null || !Mesh.Open) return p;
        // A stranger: a stand-in, in no table, until its whole hello has decrypted (ReceiveClientHello
        // admits it then), so a hello that fails admits nobody and displaces nobody.
        var stranger = new Peer(-1, new PeerConfig { PublicKey = key }, _psk, _keepaliveMs, Mtu);
        if (!X25519.Dh(stranger.StaticShared, Handshaker.PrivateKey, key)) return null;
        return _stranger = stranger;
    }

    private Peer? _stranger;                     // FindOrAdmitPeer's stand-in for the hello at hand

    internal Peer AddPeer(PeerConfig pc, in Key32 psk, long persistentKeepaliveMs)
    {
        int id = Peers.FindIndex(x => !x.Active);                  // reuse the slot of a removed peer
        var p = new Peer(id >= 0 ? id : Peers.Count, pc, psk, persistentKeepaliveMs, Mtu);
        if (!X25519.Dh(p.StaticShared, Handshaker.PrivateKey, p.PublicKey))
            throw new ConfigException($"peer {p.Name} is not a usable public key (low-order point)");
        if (id >= 0) Peers[id] = p;
        else Peers.Add(p);
        _byKey[KeyId.Of(p.PublicKey)] = p;
        p.Signal = Signal;
        p.Jitter = _jitter;
        Signal.Poke();                                               // its forget deadline, if learned
        return p;
    }

    /// <summary>Drops a peer and everything it held; the caller rebuilds the routes.</summary>
    internal void RemovePeer(Peer p, string reason = "config")
    {
        DropSessions(p);
        p.ClearStaged(ref StagedBytes);
        _byKey.Remove(KeyId.Of(p.PublicKey));
        Mesh.Forget(p);
        if (p.Up) p.DownAtMs = Math.Max(p.DownAtMs, p.LastRxMs);     // for /healthz: up until it was last heard
        p.OnRemoved();
        p.PersistentKeepaliveAtMs = p.LivenessAtMs = p.ReconnectAtMs = p.ExchangeAtMs = p.ClaimsExpireAtMs = p.PunchAtMs = 0;
        Relays.Forget(p);
        StopRelayingThrough(p);
        p.Psk.Clear();
        p.StaticShared.Clear();
        p.FecIn = null;                                               // its parity state (§12.1)
        p.FecOut = null;
        Macs.Remove(p.Id, 0);
        if (p.Provisional) Log.Debug("peer_removed", $"peer={p.Name} reason=not_confirmed");
        else Log.Info("peer_removed", $"peer={p.Name} reason={reason}");
    }

    /// <summary>After the policy may have changed (a reload, `veil set exit-node`): claims it no
    /// longer accepts go, and the exit node's announced default routes come in.</summary>
    internal void ExitChanged()
    {
        foreach (Peer p in Peers)
            if (p.Active)
            {
                Mesh.Recheck(p);
                foreach (Claim c in p.DefaultClaims)
                    if (!p.Claims.Contains(c) && p.Claims.Count < Tune.MaxClaimsPerMember && Mesh.Refusal(p, c.Prefix) == null) p.Claims.Add(c);
            }
        RebuildRoutes();
    }

    /// <summary>Applies a reloaded config's reloadable keys: peers (added, removed, changed), rates,
    /// rekey time. Sessions of peers whose key stays are kept.</summary>
    internal void Apply(UpConfig cfg, long nowMs)
    {
        if (cfg.SecretsRead)                                  // a rotation: new handshakes use the new secret
        {
            _psk = cfg.Psk;
            foreach (Peer p in Peers) if (p.Active && !p.OwnPsk) p.Psk = _psk;
            SetAcceptPsks(cfg.AcceptPsks);
            if (Invites != null) Invites.Psk = _psk;
        }
        var wanted = new Dictionary<KeyId, PeerConfig>();
        foreach (PeerConfig pc in cfg.Peers) wanted[KeyId.Of(pc.PublicKey)] = pc;
        foreach (Peer p in Peers)
            if (p.Active && !p.Learned && !wanted.ContainsKey(KeyId.Of(p.PublicKey))) RemovePeer(p);
        foreach (PeerConfig pc in cfg.Peers)
        {
            if (Mesh.IsRevoked(pc.PublicKey)) { Log.Warn("peer_revoked", $"peer={pc.Name} source=config hint=\"the network's admin revoked this key; remove it from the config\""); continue; }
            Peer? p = FindPeer(pc.PublicKey);
            if (p == null)
            {
                p = AddPeer(pc, _psk, cfg.PersistentKeepaliveMs);
                Log.Info("peer_added", $"peer={p.Name}");
                if (p.Endpoint.IsSet) StartHandshake(p, nowMs, retransmit: false);
                continue;
            }
            p.Name = pc.Name;
            p.OnConfigured();                               // now in the config: never forgotten
            if (pc.EndpointText != p.ConfiguredEndpoint)
            {
                if (pc.Endpoint.IsSet) p.Endpoint = pc.Endpoint;   // none given: keep where it was last heard from
                p.ConfiguredEndpoint = pc.EndpointText;
            }
            p.PersistentKeepaliveMs = pc.KeepaliveMs >= 0 ? pc.KeepaliveMs : cfg.PersistentKeepaliveMs;
            if (p.PersistentKeepaliveMs == 0) p.PersistentKeepaliveAtMs = 0;
            else if (p.PersistentKeepaliveAtMs == 0) p.PersistentKeepaliveAtMs = nowMs + p.PersistentKeepaliveMs;
            p.Allowed.Clear();
            p.Allowed.AddRange(pc.Allowed);
            if (string.Join(',', p.AllowedMacs) != string.Join(',', pc.AllowedMacs)) Macs.Remove(p.Id, 0);   // learned under the old list
            p.AllowedMacs.Clear();
            p.AllowedMacs.AddRange(pc.AllowedMacs);
            p.TcpRemote = pc.Tcp;
            p.Isolated = pc.Isolated;
            p.NamedByConfig = pc.NameGiven;
            bool keep = p.OwnPsk && pc.PskKept;
            p.OwnPsk = pc.PskFile.Length > 0;
            if (!keep) p.Psk = p.OwnPsk ? pc.Psk : _psk;
        }
        _keepaliveMs = cfg.PersistentKeepaliveMs;
        if (Mesh.Configure(cfg)) ScheduleExchange(nowMs);
        ExitChanged();
        RekeyAfterMs = cfg.RekeyAfterTimeMs;
        ConfigurePolicy(cfg);
        Admission.Rate = cfg.HandshakeRate;
        Admission.RatePerSource = cfg.HandshakeRatePerSource;
        Admission.MaxSessions = cfg.MaxSessions;
        FecAuto = cfg.Fec;
        if (Relays.Offered != cfg.Relay) ScheduleExchange(nowMs);      // our Self says whether we relay
        Relays.Configure(cfg);
    }

    /// <summary>Starts handshakes with every peer we know an endpoint for.</summary>
    internal void Start(long nowMs)
    {
        foreach (Peer p in Peers)
            if (p.Endpoint.IsSet) StartHandshake(p, nowMs, retransmit: false);
    }

    // ---- 14.1 Outbound: TUN -> route -> session -> seal ----

    internal void ProcessTunBatch(PacketBatch b, long nowMs)
    {
        for (int i = 0; i < b.Count; i++)
        {
            Span<byte> packet = b.Packet(i);
            Counters.TunRxPackets++;
            int peerId = Mode == L2Mode.Tun ? RouteOf(packet, destination: true) : SwitchOf(packet, nowMs);
            b.Length[i] = 0;
            if (peerId == FloodAll) { Flood(packet, nowMs); continue; }
            if (peerId < 0) { Counters.Drop(peerId == -2 ? DropReason.Malformed : Ip.IsLinkScope(packet) ? DropReason.LinkLocal : DropReason.NoRoute); continue; }
            Peer p = Peers[peerId];
            if (Filter != null && !Filter.Allow(packet, p, outbound: true, nowMs)) { Counters.Drop(DropReason.Filtered); continue; }
            if (!CanSend(p, nowMs)) { Stage(p, packet, nowMs); continue; }
            Session s = p.Current!;
            FecSender? fec = ParityFor(p, nowMs);
            if (fec != null)
            {
                if (fec.MustClose(s, s.SendCounter, ParityOut)) SendParity(p, fec, nowMs);
                if (fec.Members == 0) OpenGroup(p, fec, nowMs);
                fec.Add(s, s.SendCounter, packet, nowMs);
            }
            int len = Record.Seal(s, b.Slot(i), packet.Length, DataFlags(s, nowMs), Mtu);
            AfterSend(p, s, len, nowMs, carriesData: true);
            if (p.Relay != null && PathRelay(p, nowMs) is Peer relay)
            {
                b.Slot(i)[..len].CopyTo(NextOut(relay.Endpoint)[RelayHeadroomLen..]);
                WrapForRelay(relay, p, len, nowMs);
                continue;
            }
            if (TcpLinks.IsTcp(p.Endpoint))                 // TCP links are written under the lock (Worker.FlushUdp)
            {
                b.Slot(i)[..len].CopyTo(NextOut(p.Endpoint));
                UdpOut.Alone[UdpOut.Count] = true;
                CommitOut(len);
                continue;
            }
            b.Offset[i] = 0;
            b.Length[i] = len;
            b.Endpoints[i] = p.Endpoint;
            if (fec != null && fec.Members >= fec.Want) SendParity(p, fec, nowMs);
        }
    }

    // No session to send under yet: the packet waits (a few per peer) for the handshake it starts.
    private void Stage(Peer p, ReadOnlySpan<byte> packet, long nowMs)
    {
        if (!p.Stage(packet, ref StagedBytes)) Counters.Drop(DropReason.QueueFull);
        if (p.Next == null || nowMs - p.Next.CreatedMs >= Spec.RekeyTimeoutMs) StartHandshake(p, nowMs, retransmit: false);
    }

    private const int FloodAll = -3;

    // --mode tap|hub: the peer that owns the frame's destination MAC, or FloodAll; -2 for a runt.
    private int SwitchOf(ReadOnlySpan<byte> frame, long nowMs)
    {
        if (frame.Length < Ethernet.HeaderLen) return -2;
        ulong to = Ethernet.Mac(frame);
        if (Mode == L2Mode.Hub || Ethernet.IsGroup(to)) return FloodAll;
        int id = Macs.Lookup(to, nowMs);
        if (id < 0 || !Peers[id].Active) { FramesUnknown++; return FloodAll; }
        FramesSwitched++;
        return id;
    }

    // A sealed copy to every member, through UdpOut: broadcast, multicast, unknown unicast, a hub's all.
    private void Flood(ReadOnlySpan<byte> frame, long nowMs)
    {
        FramesFlooded++;
        foreach (Peer p in Peers)
        {
            if (!p.Active || p.Provisional) continue;
            if (!CanSend(p, nowMs)) { Stage(p, frame, nowMs); continue; }
            Session s = p.Current!;
            Span<byte> slot = NextOut(p, nowMs);
            frame.CopyTo(slot[Record.PayloadOffset..]);
            int len = Record.Seal(s, slot, frame.Length, DataFlags(s, nowMs), Mtu);
            CommitOut(p, len, nowMs);
            AfterSend(p, s, len, nowMs, carriesData: true);
        }
    }

    // Flags for a data record: Bind on an initiator's first record, Rekey when a responder's session is due.
    private RecordFlags DataFlags(Session s, long nowMs)
    {
        RecordFlags f = RecordFlags.Data;
        if (s.IsInitiator && s.SendCounter == 0) f |= RecordFlags.Bind;
        if (!s.IsInitiator && nowMs - s.CreatedMs >= RekeyAfterMs) f |= RecordFlags.Rekey;
        return f;
    }

    private void AfterSend(Peer p, Session s, int recordLen, long nowMs, bool carriesData)
    {
        Counters.TxRecords++;
        Counters.TxBytes += recordLen;
        p.TxBytes += recordLen;
        p.OnDataSent(nowMs, carriesData);
        long age = nowMs - s.CreatedMs;
        if (s.IsInitiator ? age >= RekeyAfterMs || s.SendCounter >= Spec.RekeyAfterMessages
                          : age >= Spec.RejectAfterTimeMs - Spec.KeepaliveTimeoutMs - Spec.RekeyTimeoutMs)
            StartHandshake(p, nowMs, retransmit: false);
    }

    // Where peers were last authenticated, for the cookie budget under a hello flood; rebuilt at most
    // once a second, and only while a flood is being refused (an endpoint that moved meanwhile waits).
    private readonly HashSet<Endpoint> _peerEndpoints = new();
    private long _peerEndpointsAtMs = long.MinValue / 2;

    private bool IsPeerEndpoint(in Endpoint from, long nowMs)
    {
        if (nowMs - _peerEndpointsAtMs >= 1000)
        {
            _peerEndpointsAtMs = nowMs;
            _peerEndpoints.Clear();
            foreach (Peer q in Peers)
                if (q.Active && q.Endpoint.IsSet) _peerEndpoints.Add(q.Endpoint);
        }
        return _peerEndpoints.Contains(from);
    }

    /// <summary>Peers with a session (any of Previous, Current, Next): what --max-sessions bounds.</summary>
    internal int PeersHoldingKeys()
    {
        int n = 0;
        foreach (Peer q in Peers)
            if (q.Active && q.HoldsKeys) n++;
        return n;
    }

    /// <summary>The peer routed for the packet's destination (or source); -1 no route, -2 not an IP packet.</summary>
    internal int RouteOf(ReadOnlySpan<byte> packet, bool destination)
    {
        if (packet.Length >= Ip.V4HeaderLen && Ip.Version(packet) == 4)
            return Routes.Lookup(packet.Slice(destination ? Ip.V4DestinationOffset : Ip.V4SourceOffset, 4));
        if (packet.Length >= Ip.V6HeaderLen && Ip.Version(packet) == 6)
            return Routes.Lookup(packet.Slice(destination ? Ip.V6DestinationOffset : Ip.V6SourceOffset, 16));
        return -2;
    }

    // ---- 14.2 Inbound: UDP -> open -> replay -> source check -> TUN ----

    // Transport records of live sessions go first, handshake messages after them: in a batch that a
    // hello flood fills, the data waits for none of the handshake work (WireGuard gives handshakes a
    // queue of their own for the same reason). A bit per slot remembers what waits for the second pass.
    internal void ProcessUdpBatch(PacketBatch b, long nowMs)
    {
        ulong deferred = 0;
        for (int i = 0; i < b.Count; i++)
        {
            RecordKind kind = Record.Classify(b.Packet(i));
            if (kind != RecordKind.Transport && i < 64) { deferred |= 1UL << i; continue; }
            ReceiveDatagram(b, i, kind, nowMs);
        }
        for (int i = 0; deferred != 0; i++, deferred >>= 1)
            if ((deferred & 1) != 0) ReceiveDatagram(b, i, Record.Classify(b.Packet(i)), nowMs);
        if (_spareCount > 0) PlaceSpares(b);
    }

    private void ReceiveDatagram(PacketBatch b, int i, RecordKind kind, long nowMs)
    {
        Span<byte> d = b.Packet(i);
        Endpoint from = b.Endpoints[i];
        b.Length[i] = 0;
        switch (kind)
        {
            case RecordKind.Transport:
                int n = ReceiveTransport(d, from, nowMs, out int ipOffset);
                if (n > 0) { b.Offset[i] += ipOffset; b.Length[i] = n; }
                break;
            case RecordKind.ClientHello: ReceiveClientHello(d, from, nowMs); break;
            case RecordKind.ServerHello: ReceiveServerHello(d, from, nowMs); break;
            case RecordKind.CookieReply: ReceiveCookieReply(d, nowMs); break;
            case RecordKind.Join: ReceiveJoin(d, from); break;
            default: Counters.Drop(d.Length < Spec.PreambleLen + 1 ? DropReason.Truncated : DropReason.Malformed); break;
        }
    }

    // Returns the length of the IP packet now at d[ipOffset..], or 0 when nothing goes to the TUN.
    private int ReceiveTransport(Span<byte> d, in Endpoint from, long nowMs, out int ipOffset)
    {
        ipOffset = Record.PayloadOffset;
        Session? s = Indexes.FindSession(Record.ReceiverIndex(d));
        if (s == null) { Counters.Drop(DropReason.UnknownIndex); return 0; }
        Peer p = s.Peer;
        if (p == _via) { Counters.Drop(DropReason.RelayRefused); return 0; }   // a relay's own record, inside its Relay record
        if (nowMs - s.CreatedMs >= Spec.RejectAfterTimeMs) { Counters.Drop(DropReason.Expired); return 0; }
        OpenVerdict v = Record.Open(s, d, out int len, out RecordFlags flags);
        // A record that parity rebuilt before it came (reordered): late, not a replay.
        if (v == OpenVerdict.Replayed && p.FecIn != null && p.FecIn.WasRebuilt(s, Record.Counter(d))
            && Record.Authentic(s, d))
        {
            FecLate++;
            s.Received++;                                  // it did arrive: not a loss to measure
            return 0;
        }
        if (v != OpenVerdict.Ok)
        {
            Counters.Drop(v switch
            {
                OpenVerdict.Replayed => DropReason.Replayed, OpenVerdict.TooOld => DropReason.TooOld,
                OpenVerdict.BadAuth => DropReason.BadAuth, OpenVerdict.Truncated => DropReason.Truncated, _ => DropReason.Malformed,
            });
            // Sustained failures on a live index: our keys may be stale (the peer lost its state), so
            // start a fresh handshake; the old session stays until the new one replaces it. Anyone who
            // saw one record can forge such failures, so they count only while no good record comes
            // for RecoveryQuietMs, and recovery starts at most once per RecoveryIntervalMs.
            if (p.FailuresSinceGood == 0) p.FirstFailureMs = nowMs;
            if (p.FailuresSinceGood < int.MaxValue) p.FailuresSinceGood++;
            if (p.FailuresSinceGood >= Tune.DecryptFailuresBeforeRehandshake && nowMs - p.FirstFailureMs >= Tune.RecoveryQuietMs
                && nowMs - p.LastRecoveryMs >= Tune.RecoveryIntervalMs)
            {
                p.LastRecoveryMs = nowMs;
                Log.Warn("session_recovery", $"peer={p.Name} failures={p.FailuresSinceGood} quiet_ms={nowMs - p.FirstFailureMs} rule=decrypt_failures");
                StartHandshake(p, nowMs, retransmit: false);
            }
            return 0;
        }
        Counters.RxRecords++;
        Counters.RxBytes += d.Length;
        p.RxBytes += d.Length;
        s.Received++;
        if (s != p.LossSession && (p.LossSession == null || s.CreatedMs >= p.LossSession.CreatedMs)) MeasureOn(p, s, nowMs);
        else if (p.FecAtMs == 0) p.FecAtMs = nowMs + Fec.ReportIntervalMs;
        Heard(p, from, d.Length, nowMs);          // roaming: replies go where the peer is now
        if (!s.Confirmed) ConfirmSession(p, s, nowMs);
        p.OnDataReceived(nowMs, len > 0);
        if ((flags & RecordFlags.Close) != 0)
        {
            Log.Info("session_closed", $"peer={p.Name} reason=peer_close");
            DropSessions(p);
            MarkDown(p, nowMs, "peer_close");      // its claims are withdrawn now, not at the liveness timeout
            // A peer that left may come back (a restart, a reboot): try again shortly, with the
            // usual retransmit backoff and give-up, so the link returns without traffic or operator.
            if (p.ConfiguredEndpoint.Length > 0) p.NewHandshakeAtMs = nowMs + Spec.FirstRetransmitMs;
            else if (p.Learned) p.OnReconnectFailed(nowMs);
            return 0;
        }
        if (!p.Up && s == p.Current) MarkUp(p, nowMs);
        // The peer asks for new keys (a responder whose session is due sets Rekey), or ours is nearly
        // expired. A request is honoured unless our newest keys are younger than RekeyTimeout: records
        // sealed before the peer saw them may still ask, and a peer cannot make us handshake nonstop.
        bool asked = (flags & RecordFlags.Rekey) != 0 && (p.Current == null || nowMs - p.Current.CreatedMs >= Spec.RekeyTimeoutMs);
        bool expiring = s.IsInitiator && s == p.Current && nowMs - s.CreatedMs >= Spec.RejectAfterTimeMs - Spec.KeepaliveTimeoutMs - Spec.RekeyTimeoutMs;
        if (asked || expiring) StartHandshake(p, nowMs, retransmit: false);
        if ((flags & RecordFlags.Control) != 0) { Mesh.Receive(p, d.Slice(Record.PayloadOffset, len), nowMs); return 0; }
        if ((flags & RecordFlags.Relay) != 0)
        {
            int n = ReceiveRelay(p, d.Slice(Record.PayloadOffset, len), nowMs, out int innerOffset);
            ipOffset = Record.PayloadOffset + 1 + innerOffset;
            return n;
        }
        if (flags == RecordFlags.Parity) return ReceiveParity(p, s, d, len, nowMs, out ipOffset);
        if (len == 0 || (flags & RecordFlags.Data) == 0) return 0;   // keepalive or bind
        p.FecIn?.Keep(s, Record.Counter(d), d.Slice(Record.PayloadOffset, len));
        return AcceptData(p, d.Slice(Record.PayloadOffset, len), nowMs, rebuilt: false);
    }

    // A data record's payload (or one rebuilt from parity) on its way to the TUN: its IP length, or 0
    // when one of the checks refuses it.
    private int AcceptData(Peer p, ReadOnlySpan<byte> packet, long nowMs, bool rebuilt)
    {
        if (Mode != L2Mode.Tun) return AcceptFrame(p, packet, nowMs, rebuilt);
        int len = packet.Length;
        int ipLen = IpPacketLen(packet);
        if (ipLen <= 0 || ipLen > len) { Counters.Drop(DropReason.Malformed); return 0; }
        if (RouteOf(packet, destination: false) != p.Id && !PeerServes(p, Ip.Version(packet) == 4 ? packet.Slice(Ip.V4SourceOffset, 4) : packet.Slice(Ip.V6SourceOffset, 16)))
        {
            Counters.Drop(DropReason.SourceNotAllowed);
            return 0;
        }
        // --isolate, or a peer marked isolated on either end: what one peer sends to another through us
        // (our kernel would forward it back into the tunnel) stops here. To us, and to what no peer
        // routes (an exit's uplink), it passes.
        if ((Isolate || AnyIsolated) && RouteOf(packet, destination: true) is int to && to >= 0 && to != p.Id && (Isolate || p.Isolated || Peers[to].Isolated))
        {
            Counters.Drop(DropReason.Isolated);
            return 0;
        }
        if (ExitFor != null && ExitRefused(p) && ForTheExit(packet))
        {
            Counters.Drop(DropReason.ExitRefused);
            return 0;
        }
        if (Filter != null && !Filter.Allow(packet[..ipLen], p, outbound: false, nowMs))
        {
            Counters.Drop(DropReason.Filtered);
            return 0;
        }
        Counters.TunTxPackets++;
        return ipLen;
    }

    // --mode tap|hub: the frame's length, or 0 when its source MAC is not the peer's to use (§8.1).
    // A record says exactly how long its frame is; a rebuilt one has the length of the group's longest.
    private int AcceptFrame(Peer p, ReadOnlySpan<byte> frame, long nowMs, bool rebuilt)
    {
        int len = rebuilt ? Ethernet.RebuiltLen(frame) : frame.Length;
        if (len < Ethernet.HeaderLen) { Counters.Drop(DropReason.Malformed); return 0; }
        ulong from = Ethernet.Mac(frame[Ethernet.SourceOffset..]);
        if (Ethernet.IsGroup(from) || from == 0 || from == LocalMac || p.AllowedMacs.Count > 0 && !p.AllowedMacs.Contains(from)
            || Macs.Learn(from, p.Id, nowMs) == Learned.Refused)
        {
            Counters.Drop(DropReason.MacNotAllowed);
            return 0;
        }
        Counters.TunTxPackets++;
        return len;
    }

    /// <summary>Total length from the IP header (padding removed), or 0 when it is not a sane IP header.</summary>
    internal static int IpPacketLen(ReadOnlySpan<byte> p)
    {
        if (p.Length >= Ip.V4HeaderLen && Ip.Version(p) == 4) return BinaryPrimitives.ReadUInt16BigEndian(p[Ip.V4TotalLengthOffset..]) is var l and >= Ip.V4HeaderLen ? l : 0;
        if (p.Length >= Ip.V6HeaderLen && Ip.Version(p) == 6) return Ip.V6HeaderLen + BinaryPrimitives.ReadUInt16BigEndian(p[Ip.V6PayloadLengthOffset..]);
        return 0;
    }

    // Responder: the first record under Next proves the initiator has the keys (the Bind).
    private void ConfirmSession(Peer p, Session s, long nowMs)
    {
        if (p.Next != s) return;
        s.Confirmed = true;
        p.RttUs = (long)Stopwatch.GetElapsedTime(s.CreatedTicks).TotalMicroseconds;          // our ServerHello to its first record
        Indexes.RemoveSession(p.Previous);
        p.Previous = p.Current;
        p.Current = s;
        p.Next = null;
        Counters.HandshakesCompleted++;
        Log.Info("handshake_complete", $"peer={p.Name} role=responder endpoint={p.Endpoint} path={p.PathName} aead={s.AeadKind}");
        FlushStaged(p, nowMs);
    }

    // The cookie-reply budgets: a global one, and a second for the endpoints of our peers.
    private bool CanReplyCookie(in Endpoint from, long nowMs) =>
        Admission.AllowCookieReply(nowMs) || IsPeerEndpoint(from, nowMs) && Admission.AllowPeerCookieReply(nowMs);

    private void RefuseCookie(in Endpoint from, long nowMs)
    {
        Admission.RefusedCookies++;                              // dropped unanswered: the flood costs one HMAC each
        Admission.Unanswered(from, nowMs);
        Counters.Drop(DropReason.Refused);
    }

    private void ReceiveClientHello(ReadOnlySpan<byte> d, in Endpoint from, long nowMs)
    {
        // Cheapest checks first: MAC1 (one HMAC). Within the global budget a hello is answered.
        // Beyond it a hello must carry a cookie for its source address (else it gets a cookie
        // reply), and only such proven sources are charged a per-source budget: a forger cannot
        // spend the budget of the address it forges, so it cannot lock that peer out.
        HandshakeVerdict v = HandshakeVerdict.Ok;
        Span<byte> cookie = stackalloc byte[Spec.MacLen];
        if (_via == null && Admission.Muted(from, nowMs) && !IsPeerEndpoint(from, nowMs))
        {
            Admission.RefusedSource++;
            Counters.Drop(DropReason.Refused);
            return;
        }
        if (!Handshaker.Mac1Matches(d)) v = HandshakeVerdict.BadMac1;
        else if (_via == null && Admission.UnderLoad(nowMs))             // a relay's member has proven itself
        {
            // A hello without a cookie that the reply budget cannot answer is dropped before the
            // cookie's HMAC: in a flood, most are.
            if (!Handshaker.HasMac2(d) && !CanReplyCookie(from, nowMs)) { RefuseCookie(from, nowMs); return; }
            Handshaker.MakeCookie(from, nowMs, cookie);
            if (!Handshaker.CookieMatches(d, cookie)) v = HandshakeVerdict.NeedCookie;
            else if (!Admission.AllowSource(from, nowMs)) v = HandshakeVerdict.RateLimited;
        }
        _admitNowMs = nowMs;
        if (v == HandshakeVerdict.Ok && AnswerAgain(AnsweredBy[d[Wire.ClientHelloEphemeralOffset]], d, from, nowMs)) return;
        if (v == HandshakeVerdict.Ok) v = Handshaker.ConsumeClientHello(d, from, nowMs, _hello);
        // --max-sessions counts peers holding keys (each holds up to three key pairs), so the default
        // admits as many peers as a node can have; a peer that holds keys already is never refused.
        if (v == HandshakeVerdict.Ok && !_hello.Peer!.HoldsKeys && PeersHoldingKeys() >= Admission.MaxSessions)
        {
            Admission.RefusedSessions++;
            v = HandshakeVerdict.RateLimited;
        }
        if (_stranger is Peer s0)
        {
            _stranger = null;
            if (v == HandshakeVerdict.Ok && _hello.Peer == s0)
            {
                Peer? q = AddLearned(s0.PublicKey, nowMs, provisional: true);
                if (q == null) v = HandshakeVerdict.RateLimited;
                else
                {
                    s0.LastHelloTimestamp.CopyTo(q.LastHelloTimestamp, 0);
                    s0.RecentHelloIds.CopyTo(q.RecentHelloIds, 0);
                    q.RecentHelloNext = s0.RecentHelloNext;
                    _hello.Peer = q;
                }
            }
            s0.StaticShared.Clear();
        }
        switch (v)
        {
            case HandshakeVerdict.Ok: break;
            case HandshakeVerdict.NeedCookie:
                if (Handshaker.HasMac2(d) && !CanReplyCookie(from, nowMs)) { RefuseCookie(from, nowMs); return; }   // budget spent above otherwise
                int len = Handshaker.CreateCookieReply(d, cookie, NextOut(from));
                CommitOut(len);
                Counters.CookiesSent++;
                return;
            case HandshakeVerdict.BadMac1:
                Counters.Drop(DropReason.BadMac1);
                if (Log.Wants(LogLevel.Warn, "handshake_dropped"))
                    Log.Emit(LogLevel.Warn, "handshake_dropped", $"reason=bad_mac1 from={from} hint=\"the sender does not have our public key\"");
                return;
            case HandshakeVerdict.UnknownPeer:
                Counters.Drop(DropReason.UnknownPeer);
                if (Log.Wants(LogLevel.Warn, "handshake_dropped"))
                    Log.Emit(LogLevel.Warn, "handshake_dropped", $"reason=unknown_peer from={from} hint=\"ClientHello from a key that is not a configured peer\"");
                return;
            case HandshakeVerdict.RateLimited:
                Counters.Drop(DropReason.Refused);
                if (Log.Wants(LogLevel.Debug, "handshake_refused")) Log.Emit(LogLevel.Debug, "handshake_refused", $"from={from} rule=admission");
                return;
            case HandshakeVerdict.StaleHello:
                if (AnswerAgain(_hello.Peer, d, from, nowMs)) return;
                Counters.Drop(DropReason.StaleHello);
                if (Log.Wants(LogLevel.Debug, "handshake_dropped")) Log.Emit(LogLevel.Debug, "handshake_dropped", $"reason=stale_hello from={from}");
                return;
            default:
                Counters.Drop(DropReason.HandshakeFailed);
                if (Log.Wants(LogLevel.Debug, "handshake_dropped")) Log.Emit(LogLevel.Debug, "handshake_dropped", $"reason=client_hello_auth from={from}");
                return;
        }
        Peer p = _hello.Peer!;
        uint localIndex = Indexes.NewIndex();
        Span<byte> reply = AnswerSlot(from);
        int n = Handshaker.CreateServerHello(_hello, localIndex, nowMs, reply, out SessionKeys? keys);
        if (n == 0 || keys == null) { Counters.Drop(DropReason.HandshakeFailed); return; }
        p.AnsweredHello ??= new byte[Wire.ClientHelloMac2Offset];
        p.Answer ??= new byte[Wire.ServerHelloLen];
        d[..Wire.ClientHelloMac2Offset].CopyTo(p.AnsweredHello);
        reply[..n].CopyTo(p.Answer);
        p.AnsweredAtMs = nowMs;
        p.AnswerRepeats = 0;
        AnsweredBy[d[Wire.ClientHelloEphemeralOffset]] = p;
        SendAnswer(p, n, nowMs);
        var s = new Session(p, keys, nowMs);
        Indexes.RemoveSession(p.Next);
        p.Next = s;
        Indexes.AddSession(s);
        p.OnSessionDerived(nowMs, UnixNs());
        Log.Debug("server_hello_sent", $"peer={p.Name} endpoint={from}");
    }

    private Span<byte> AnswerSlot(in Endpoint from) => _via is Peer via ? NextOut(via.Endpoint)[RelayHeadroomLen..] : NextOut(from);

    private void SendAnswer(Peer p, int len, long nowMs)
    {
        if (_via != null) WrapForRelay(_via, p, len, nowMs);
        else CommitOut(len);                     // answered the way it came; the endpoint moves on the Bind
    }

    // A hello we answered, sent again (a retransmit repeats it, §10): the same ServerHello goes back,
    // the way this copy came, while its session waits for the Bind. No Diffie-Hellman, nothing else
    // changes, and a replay of it earns at most MaxAnswerRepeats copies of what was already sent.
    private bool AnswerAgain(Peer? p, ReadOnlySpan<byte> hello, in Endpoint from, long nowMs)
    {
        if (p?.AnsweredHello == null || p.Answer == null || p.Next == null || nowMs - p.AnsweredAtMs >= Spec.RekeyTimeoutMs ||
            p.AnswerRepeats >= Tune.MaxAnswerRepeats || !hello[..Wire.ClientHelloMac2Offset].SequenceEqual(p.AnsweredHello) ||
            p.Next.LocalIndex != BinaryPrimitives.ReadUInt32BigEndian(p.Answer.AsSpan(Wire.ServerHelloSenderOffset)))
            return false;
        p.AnswerRepeats++;
        p.Answer.CopyTo(AnswerSlot(from));
        SendAnswer(p, p.Answer.Length, nowMs);
        Counters.AnswersRepeated++;
        Log.Debug("server_hello_repeated", $"peer={p.Name} endpoint={from}");
        return true;
    }

    private void ReceiveServerHello(ReadOnlySpan<byte> d, in Endpoint from, long nowMs)
    {
        if (Handshaker.CheckServerHelloMac(d) != HandshakeVerdict.Ok)
        {
            Counters.Drop(DropReason.BadMac1);
            if (Log.Wants(LogLevel.Warn, "handshake_dropped")) Log.Emit(LogLevel.Warn, "handshake_dropped", $"reason=bad_mac1 from={from} message=server_hello");
            return;
        }
        Peer? p = Indexes.FindHandshake(BinaryPrimitives.ReadUInt32BigEndian(d[Wire.ServerHelloReceiverOffset..]));
        if (p == null) { Counters.Drop(DropReason.UnknownIndex); return; }
        HandshakeVerdict v = Handshaker.ConsumeServerHello(d, p, out SessionKeys? keys);
        if (v != HandshakeVerdict.Ok || keys == null)
        {
            Counters.Drop(DropReason.HandshakeFailed);
            // Status text only: whoever saw our hello's index could forge this failure, and nothing else moves.
            p.OnFailure("server_hello_auth", nowMs);
            if (Log.Wants(LogLevel.Warn, "handshake_failed")) Log.Emit(LogLevel.Warn, "handshake_failed", $"peer={p.Name} reason=server_hello_auth from={from} hint=\"the peer answered but its ServerHello did not authenticate: different network secret (--psk) or wrong peer key\"");
            return;
        }
        EndHandshake(p);
        p.RttUs = (long)Stopwatch.GetElapsedTime(p.HelloSentTicks).TotalMicroseconds;   // from the latest copy of the hello
        var s = new Session(p, keys, nowMs);
        Indexes.AddSession(s);
        Indexes.RemoveSession(p.Previous);
        p.Previous = p.Current;
        p.Current = s;
        Heard(p, from, d.Length, nowMs);
        p.OnSessionDerived(nowMs, UnixNs());
        Counters.HandshakesCompleted++;
        Log.Info("handshake_complete", $"peer={p.Name} role=initiator endpoint={p.Endpoint} path={p.PathName} aead={s.AeadKind}");
        if (p.StagedCount > 0) FlushStaged(p, nowMs);
        else SendEmpty(p, nowMs, RecordFlags.Keepalive | RecordFlags.Bind);
        if (!p.Up) MarkUp(p, nowMs);
    }

    private void ReceiveCookieReply(ReadOnlySpan<byte> d, long nowMs)
    {
        Peer? p = Indexes.FindHandshake(BinaryPrimitives.ReadUInt32BigEndian(d[Wire.CookieReplyReceiverOffset..]));
        if (p == null) { Counters.Drop(DropReason.UnknownIndex); return; }
        if (!Handshaker.ConsumeCookieReply(d, p, nowMs)) { Counters.Drop(DropReason.BadAuth); return; }
        p.OnFailure("cookie", nowMs);                            // it is under load: the next hello carries the cookie
        Log.Debug("cookie_received", $"peer={p.Name}");
    }

    // ---- 14.3 Parity: loss reports, groups, rebuilding (§12.1) ----

    internal bool FecAuto = true;                 // --fec auto|off
    /// <summary>Set by a worker for the TUN batch it works on: parity goes out after the batch's records,
    /// so it never overtakes its own group's members (UdpOut leaves first).</summary>
    internal PacketBatch? ParityOut;
    internal long FecParitySent, FecParityBytes, FecParityReceived, FecRecovered, FecUnrecoverable, FecNoRoom, FecLate, FecRefused;
    // Rebuilt payloads beyond the one that takes its parity record's slot, for free slots of the batch.
    private byte[]? _spares;
    private readonly int[] _spareLen = new int[8];
    private int _spareCount;

    // The open group of data records to p, or null: no parity unless p reported loss lately and the
    // records go to it directly (a relay or a TCP link has its own recovery).
    private FecSender? ParityFor(Peer p, long nowMs)
    {
        if (!FecAuto || p.FecReportedBp == 0 || p.Relay != null || TcpLinks.IsTcp(p.Endpoint)) return null;
        if (nowMs - p.FecReportedMs >= Fec.ReportLifetimeMs) { p.FecReportedBp = 0; return null; }
        return p.FecOut ??= new FecSender(Mtu);
    }

    // The size of a group is fixed when it opens; a group that stays short is closed by the timer.
    private void OpenGroup(Peer p, FecSender f, long nowMs)
    {
        (f.Want, f.Rows) = Fec.Size(p.FecReportedBp);
        f.Batch = ParityOut;
        if (p.FecAtMs == 0 || p.FecAtMs > nowMs + Fec.HoldMs) p.FecAtMs = nowMs + Fec.HoldMs;
    }

    private void SendParity(Peer p, FecSender f, long nowMs)
    {
        // Not when the path moved to a relay or a TCP link meanwhile, nor when other records took so
        // many counters since the newest member that back would pass 64 (the receiver's reach).
        Session? s = f.GroupSession;
        if (s != null && !s.Disposed && (s == p.Current || s == p.Previous) && p.Endpoint.IsSet && p.Relay == null &&
            !TcpLinks.IsTcp(p.Endpoint) && f.Back(s.SendCounter) + (ulong)f.RowsOfGroup <= 65)
            for (int row = 0; row < f.RowsOfGroup; row++)
            {
                PacketBatch b = ParityOut is { IsFull: false } own ? own : UdpOut;
                if (b == UdpOut) NextOut(p.Endpoint);
                Span<byte> slot = b.Slot(b.Count);
                int n = f.Write(slot, row, s.SendCounter);
                int len = Record.Seal(s, slot, n, RecordFlags.Parity, Mtu);
                b.Offset[b.Count] = 0;
                b.Length[b.Count] = len;
                b.Endpoints[b.Count] = p.Endpoint;
                b.Ttl[b.Count] = 0;
                b.Alone[b.Count] = n > Mtu;            // longer than the members: never one GSO run with them
                b.Count++;
                AfterSend(p, s, len, nowMs, carriesData: false);
                FecParitySent++;
                FecParityBytes += len;
                f.ParityBytes += len;
            }
        f.Close();
    }

    private int ReceiveParity(Peer p, Session s, Span<byte> d, int len, long nowMs, out int ipOffset)
    {
        ipOffset = Record.PayloadOffset + Fec.HeaderLen;
        FecParityReceived++;
        if (ReceiverFor(p, nowMs) is not FecReceiver f) { FecRefused++; return 0; }
        if (p.FecAtMs == 0) p.FecAtMs = nowMs + Fec.ReportIntervalMs;      // frees it when idle
        long rebuilt = f.Use(s, Record.Counter(d), d.Slice(Record.PayloadOffset, len), nowMs);
        if (rebuilt == FecReceiver.Malformed) { Counters.Drop(DropReason.Malformed); return 0; }
        if (rebuilt == FecReceiver.Unrecoverable) FecUnrecoverable++;
        for (int k = 0; k < f.SpareCount; k++)
        {
            if (!s.Window.Accept(f.SpareCounter[k]) || AcceptData(p, f.Spare(k), nowMs, rebuilt: true) is not (int spareLen and > 0)) continue;
            FecRecovered++;
            if (_spareCount == _spareLen.Length) { FecNoRoom++; continue; }
            _spares ??= new byte[_spareLen.Length * Mtu];
            f.Spare(k)[..spareLen].CopyTo(_spares.AsSpan(_spareCount * Mtu));
            _spareLen[_spareCount++] = spareLen;
        }
        if (rebuilt < 0 || !s.Window.Accept((ulong)rebuilt)) return 0;
        FecRecovered++;
        return AcceptData(p, d.Slice(ipOffset, len - Fec.HeaderLen), nowMs, rebuilt: true);
    }

    // A receiver keeps 128 payloads (190 KB at the default MTU): for MaxReceivers peers at most, so
    // members that send parity unasked cannot make a router spend its memory on it.
    private const int MaxFecReceivers = 16;
    private int _fecReceivers;
    private long _fecCountedMs = long.MinValue / 2;

    private FecReceiver? ReceiverFor(Peer p, long nowMs)
    {
        if (p.FecIn != null) return p.FecIn;
        if (nowMs - _fecCountedMs >= 1000)                          // freed ones (idle, removed peers) count again
        {
            _fecCountedMs = nowMs;
            _fecReceivers = 0;
            foreach (Peer q in Peers) if (q.Active && q.FecIn != null) _fecReceivers++;
        }
        if (_fecReceivers >= MaxFecReceivers) return null;
        _fecReceivers++;
        return p.FecIn = new FecReceiver(Mtu) { UsedMs = nowMs };
    }

    // The spare payloads go into slots of the batch that nothing else uses, else after its last one.
    private void PlaceSpares(PacketBatch b)
    {
        int slot = 0;
        for (int k = 0; k < _spareCount; k++)
        {
            while (slot < b.Count && b.Length[slot] != 0) slot++;
            if (slot == b.Count && b.IsFull) { FecNoRoom += _spareCount - k; break; }
            if (slot == b.Count) b.Count++;
            _spares.AsSpan(k * Mtu, _spareLen[k]).CopyTo(b.Slot(slot));
            b.Offset[slot] = 0;
            b.Length[slot] = _spareLen[k];
        }
        _spareCount = 0;
    }

    // The measure follows the session p's records come on: a newer one starts it again (the older
    // one's stragglers during a rotation do not count).
    private static void MeasureOn(Peer p, Session s, long nowMs)
    {
        p.LossSession = s;
        p.LossCarry = 0;
        p.LossHighest = s.Window.Highest;
        p.LossReceived = s.Received;
        p.LossSinceMs = nowMs;
        if (p.FecAtMs == 0 || p.FecAtMs > nowMs + Fec.ReportIntervalMs) p.FecAtMs = nowMs + Fec.ReportIntervalMs;
    }

    private void ExpiredFec(Peer p, long nowMs)
    {
        p.FecAtMs = 0;
        FecSender? f = p.FecOut;
        if (f != null && f.Members > 0 && nowMs - f.OpenedMs >= Fec.HoldMs) SendParity(p, f, nowMs);
        if (nowMs - p.LossSinceMs >= Fec.ReportIntervalMs) MeasureLoss(p, nowMs);
        if (f != null && f.Members == 0 && nowMs - f.UsedMs >= Fec.IdleMs) p.FecOut = null;
        if (p.FecIn != null && nowMs - p.FecIn.UsedMs >= Fec.IdleMs) p.FecIn = null;
        long next = 0, measureAt = p.LossSinceMs + Fec.ReportIntervalMs;
        if (measureAt <= nowMs) measureAt = nowMs + Fec.ReportIntervalMs;          // an interval that lacked records runs on
        if (p.FecOut is { Members: > 0 } open) next = open.OpenedMs + Fec.HoldMs;
        if (p.LossBp > 0 || p.LossToldBp > 0 || p.FecIn != null || p.FecOut != null) next = next == 0 ? measureAt : Math.Min(next, measureAt);
        p.FecAtMs = next;      // else the next record arms it again
    }

    // What share of p's records never arrived since the interval began: counters it used that we
    // did not open (lost, or corrupted on the way). Reordered records count where they arrive.
    private void MeasureLoss(Peer p, long nowMs)
    {
        Session? s = p.LossSession;
        if (s == null || s.Disposed) { p.LossSession = null; p.LossSinceMs = nowMs; DecayLoss(p, nowMs); return; }
        ulong expected = s.Window.Highest - p.LossHighest, got = s.Received - p.LossReceived;
        if (expected < Fec.MinMeasured)
        {
            if (nowMs - p.LossSinceMs >= 10 * Fec.ReportIntervalMs) { MeasureOn(p, s, nowMs); DecayLoss(p, nowMs); }
            return;
        }
        // Records still on their way at the end of an interval (reordered) count as lost in it and
        // arrive in the next, which then got more than it expected: that surplus is carried back,
        // and only loss seen in two intervals running counts (a boundary's stragglers never are).
        long lost = (long)expected - (long)got + p.LossCarry;
        p.LossCarry = Math.Min(0, lost);
        int bp = lost <= 0 ? 0 : (int)(lost * 10_000 / (long)expected);
        // While records are lost and parity flows, what it has to rebuild: members missing when their
        // group's parity came. On a path that also reorders that is more than the loss, and the
        // report asks for it (reordering alone asks for nothing: TCP copes with it).
        if (p.FecIn is { SeenMembers: >= Fec.MinMeasured } r)
        {
            if (bp > 0) bp = Math.Max(bp, (int)Math.Min(10_000, r.SeenMissing * 10_000 / r.SeenMembers));
            r.SeenMembers = r.SeenMissing = 0;
        }
        p.LossBp = Math.Max(Math.Min(bp, p.LossRawBp), p.LossBp / 4);   // up in two intervals, down within a few
        p.LossRawBp = bp;
        p.LossHighest = s.Window.Highest;
        p.LossReceived = s.Received;
        p.LossSinceMs = nowMs;
        TellLoss(p, nowMs);
    }

    private void DecayLoss(Peer p, long nowMs)
    {
        p.LossBp /= 4;
        TellLoss(p, nowMs);
    }

    // Told while there is loss, and once more when it is gone.
    private void TellLoss(Peer p, long nowMs)
    {
        if (p.LossBp == 0 && p.LossToldBp == 0) return;
        if (p.LossBp > 0) ReceiverFor(p, nowMs);                     // ready for the first group's members
        if (Mesh.SendLoss(p, p.LossBp, nowMs)) p.LossToldBp = p.LossBp;
    }

    internal void LossReported(Peer p, int lossBp, long nowMs)
    {
        p.FecReportedBp = lossBp;
        p.FecReportedMs = nowMs;
    }

    // ---- 14.4 Messages the node makes itself ----

    private Span<byte> NextOut(in Endpoint to)
    {
        if (UdpOut.IsFull) Sink?.FlushUdp(UdpOut);
        if (UdpOut.IsFull) UdpOut.Count = 0;         // no sink (tests): the oldest output is lost
        UdpOut.Endpoints[UdpOut.Count] = to;
        UdpOut.Offset[UdpOut.Count] = 0;
        UdpOut.Ttl[UdpOut.Count] = 0;
        UdpOut.Alone[UdpOut.Count] = false;
        return UdpOut.Slot(UdpOut.Count);
    }

    // The next slot for a record to p on its path now: to its endpoint, or (relayed) past the room
    // the Relay record around it needs. CommitOut(p, …) finishes either.
    private Span<byte> NextOut(Peer p, long nowMs) =>
        PathRelay(p, nowMs) is Peer relay ? NextOut(relay.Endpoint)[RelayHeadroomLen..] : NextOut(p.Endpoint);

    private void CommitOut(Peer p, int len, long nowMs)
    {
        if (PathRelay(p, nowMs) is Peer relay) WrapForRelay(relay, p, len, nowMs);
        else CommitOut(len);
    }

    private void CommitOut(int len)
    {
        if (len <= 0) return;
        UdpOut.Length[UdpOut.Count] = len;
        UdpOut.Count++;
    }

    internal void StartHandshake(Peer p, long nowMs, bool retransmit)
    {
        if (!retransmit && p.Pending != null) return;            // one in flight; its timer retransmits
        ChoosePath(p, nowMs);
        if (!p.Endpoint.IsSet && PathRelay(p, nowMs) == null) { p.OnFailure("no_endpoint", nowMs); return; }
        // A retransmit repeats the hello while the responder still holds its answer (§10); so does
        // a reconnect attempt, with the last attempt's hello.
        if (p.Unanswered != null && p.Pending == null && nowMs - p.Unanswered.CreatedMs < Spec.RekeyTimeoutMs)
        {
            (p.Pending, p.Unanswered) = (p.Unanswered, null);
            retransmit = true;
        }
        ForgetUnanswered(p);
        bool repeat = retransmit && p.Pending != null && nowMs - p.Pending.CreatedMs < Spec.RekeyTimeoutMs;
        if (repeat)
        {
            CommitOut(p, Handshaker.RepeatClientHello(p, nowMs, NextOut(p, nowMs)), nowMs);
            Counters.HellosRepeated++;
        }
        else
        {
            if (p.Pending != null) Indexes.RemoveHandshake(p.Pending.LocalIndex);
            else { p.HandshakeAttempts = 0; p.HandshakeStartedMs = nowMs; }
            uint index = Indexes.NewIndex();
            long unixNs = Math.Max(UnixNs(), _lastUnixNs + 1);      // strictly increasing within this process
            _lastUnixNs = unixNs;
            int len = Handshaker.CreateClientHello(p, index, unixNs, nowMs, NextOut(p, nowMs));
            if (len == 0) return;
            CommitOut(p, len, nowMs);
            Indexes.AddHandshake(index, p);
            Counters.HandshakesInitiated++;
        }
        p.HellosSent++;
        p.HelloSentTicks = Stopwatch.GetTimestamp();
        p.RetransmitHandshakeAtMs = nowMs + p.RetransmitDelayMs(p.HandshakeAttempts);
        p.HandshakeAttempts++;
        Log.Debug("client_hello_sent", $"peer={p.Name} attempt={p.HandshakeAttempts} endpoint={p.Endpoint} path={p.PathName} repeat={(repeat ? 1 : 0)}");
    }

    private void SendEmpty(Peer p, long nowMs, RecordFlags flags)
    {
        Session s = p.Current!;
        Span<byte> slot = NextOut(p, nowMs);
        int len = Record.Seal(s, slot, 0, flags, Mtu);
        CommitOut(p, len, nowMs);
        AfterSend(p, s, len, nowMs, carriesData: false);
    }

    private void FlushStaged(Peer p, long nowMs)
    {
        while (p.StagedCount > 0 && p.HasReadySession(nowMs, Spec.RejectAfterTimeMs))
        {
            Session s = p.Current!;
            ReadOnlySpan<byte> packet = p.PeekStaged();
            Span<byte> slot = NextOut(p, nowMs);
            packet.CopyTo(slot[Record.PayloadOffset..]);
            int len = Record.Seal(s, slot, packet.Length, DataFlags(s, nowMs), Mtu);
            CommitOut(p, len, nowMs);
            p.PopStaged(ref StagedBytes);
            AfterSend(p, s, len, nowMs, carriesData: true);
        }
    }

    private void ForgetUnanswered(Peer p)
    {
        if (p.Unanswered == null) return;
        Indexes.RemoveHandshake(p.Unanswered.LocalIndex);
        p.Unanswered.Clear();
        p.Unanswered = null;
    }

    // Both hellos' indexes go, and their keys (OnHandshakeComplete clears Pending's).
    internal void EndHandshake(Peer p)
    {
        if (p.Pending != null) Indexes.RemoveHandshake(p.Pending.LocalIndex);
        ForgetUnanswered(p);
        p.OnHandshakeComplete();
    }

    internal void DropSessions(Peer p)
    {
        Indexes.RemoveSession(p.Previous);
        Indexes.RemoveSession(p.Current);
        Indexes.RemoveSession(p.Next);
        p.Previous = p.Current = p.Next = null;
        EndHandshake(p);
        p.SendKeepaliveAtMs = p.NewHandshakeAtMs = p.ZeroKeysAtMs = 0;
    }

    /// <summary>Graceful leave: a Close record to every peer with a session.</summary>
    internal void Shutdown(long nowMs)
    {
        foreach (Peer p in Peers)
            if (CanSend(p, nowMs)) SendEmpty(p, nowMs, RecordFlags.Close);
    }

}

/// <summary>Moves packets between one TUN queue and one UDP socket and the node. Several workers
/// (one thread each) may share a node: the I/O runs in parallel, the node's work under its lock (the
/// node itself is single-threaded code). A flow stays on one TUN queue and a peer's datagrams on one
/// socket, so each keeps its order.</summary>
internal sealed class Worker : IPacketSink
{
    internal readonly Node Node;
    internal readonly IDataplane Tun;
    internal readonly IUdp Udp;
    private readonly PacketBatch _tunIn = new(Tune.BatchSize, Tune.SlotLen);
    private PacketBatch? _parityOut;                     // the node's parity for a TUN batch, sent after it (§14.3)
    private readonly PacketBatch _udpIn = new(Tune.BatchSize, Tune.SlotLen);
    private long _tunWriteRefused, _udpSendRefused;   // counted outside the lock, moved in by Settle
    internal long TunPackets, UdpDatagrams;          // this worker's share (status)
    internal IUdp? Handshakes;                        // the loop's worker: the handshake queue (HandshakeSteering)
    internal long HandshakeDatagrams;

    internal Worker(Node node, IDataplane tun, IUdp udp)
    {
        Node = node;
        Tun = tun;
        Udp = udp;
        node.Sink = this;
    }

    /// <summary>Moves what the I/O side counted into the node's counters; the caller holds the node's lock.</summary>
    internal void Settle()
    {
        Counters c = Node.Counters;
        c.Drops[(int)DropReason.TunWrite] += Interlocked.Exchange(ref _tunWriteRefused, 0);
        c.Drops[(int)DropReason.UdpSend] += Interlocked.Exchange(ref _udpSendRefused, 0);
        if (Tun is TunDevice t)
        {
            c.TunSuperPackets += Interlocked.Exchange(ref t.SuperPackets, 0);
            c.TunCoalesced += Interlocked.Exchange(ref t.Coalesced, 0);
            c.Drops[(int)DropReason.Malformed] += Interlocked.Exchange(ref t.Malformed, 0);
        }
    }

    private const int MaxPumpRounds = 16;           // batches per fd per wake-up, so one fd cannot starve the rest

    /// <summary>Works off what epoll reported ready on fd; false when fd is not this worker's.</summary>
    internal bool Drain(int fd, long nowMs)
    {
        if (fd == Udp.Fd) { for (int r = 0; r < MaxPumpRounds && PumpUdp(nowMs); r++) { } }
        // One batch of hellos per wake-up: the records waiting on the other fds go first, and a
        // flood beyond what is left of the CPU is dropped by the kernel at the queue, unread.
        else if (Handshakes != null && fd == Handshakes.Fd) PumpUdp(nowMs, Handshakes);
        else if (fd == Tun.Fd) { for (int r = 0; r < MaxPumpRounds && PumpTun(nowMs); r++) { } }
        else return false;
        return true;
    }

    /// <summary>The kernel offloads a TUN queue and a socket use, as they stand (UDP GSO is dropped
    /// at run time should the kernel refuse it); stand-ins have none. The start-up log and status
    /// both name them from here.</summary>
    internal static (string Name, bool On)[] Offloads(IDataplane? tun, IUdp? udp)
    {
        var t = tun as TunDevice;
        var u = udp as UdpSocket;
        return [("tun_tso", t?.OffloadsAccepted == true), ("tun_uso", t?.UdpOffloadAccepted == true),
                ("udp_gso", u?.Gso == true), ("udp_gro", u?.Gro == true)];
    }

    /// <summary>Reads up to one batch from the TUN and sends what it becomes; true if the batch was full.</summary>
    internal bool PumpTun(long nowMs)
    {
        PacketBatch b = _tunIn;
        b.Count = 0;
        int room = Math.Min(Node.Mtu, Tune.SlotLen - Record.OverheadLen - Spec.PadBlockLen);
        while (b.Count < b.Capacity)
        {
            int n = Tun.Read(b.Slot(b.Count).Slice(Record.PayloadOffset, room));
            if (n <= 0) break;
            b.Offset[b.Count] = Record.PayloadOffset;
            b.Length[b.Count] = n;
            b.Count++;
        }
        if (b.Count == 0) return false;
        TunPackets += b.Count;
        Process(b, nowMs, fromTun: true);
        SendBatch(b);
        if (_parityOut is { Count: > 0 } parity)
        {
            SendBatch(parity);
            parity.Count = 0;
        }
        return b.IsFull;
    }

    /// <summary>Receives up to one batch of datagrams and writes what they become to the TUN.</summary>
    internal bool PumpUdp(long nowMs, IUdp? from = null)
    {
        PacketBatch b = _udpIn;
        b.Count = 0;
        if ((from ?? Udp).ReceiveBatch(b) == 0) return false;
        if (from == null) UdpDatagrams += b.Count;
        else HandshakeDatagrams += b.Count;
        Process(b, nowMs, fromTun: false);
        int refused = Tun.WriteBatch(b);
        if (refused > 0) Interlocked.Add(ref _tunWriteRefused, refused);
        return b.IsFull;
    }

    /// <summary>Set on every worker but the loop's: wakes the loop when this worker's batch left it
    /// something to do (LoopSignal).</summary>
    internal Action? WakeLoop;

    // The node's part of a batch, under its lock; what the node queued itself leaves through this worker.
    private void Process(PacketBatch b, long nowMs, bool fromTun)
    {
        bool wake = false;
        lock (Node.Gate)
        {
            Node.Sink = this;
            Settle();
            if (fromTun)
            {
                if (Node.FecAuto) Node.ParityOut = _parityOut ??= new PacketBatch(Tune.BatchSize, Node.Mtu + Record.OverheadLen + Fec.HeaderLen + Spec.PadBlockLen);
                try { Node.ProcessTunBatch(b, nowMs); }
                finally { Node.ParityOut = null; }        // the timers never write into a batch this worker sends
            }
            else Node.ProcessUdpBatch(b, nowMs);
            FlushUdp(Node.UdpOut);
            if (WakeLoop != null && Node.Signal.Pending) { Node.Signal.Pending = false; wake = true; }
        }
        if (wake) WakeLoop!();
    }

    /// <summary>Runs the node's timers (on the loop's thread); the caller holds the node's lock.</summary>
    internal long PumpTimers(long nowMs)
    {
        Node.Sink = this;
        long next = Node.ProcessTimers(nowMs);
        FlushUdp(Node.UdpOut);
        Node.Signal.LoopWakeMs = next;
        Node.Signal.Pending = false;
        return next;
    }

    public void FlushUdp(PacketBatch batch)
    {
        if (Node.Tcp is TcpLinks tcp)                      // under the node's lock, like every caller
            for (int i = 0; i < batch.Count; i++)
            {
                if (batch.Length[i] == 0 || !TcpLinks.IsTcp(batch.Endpoints[i])) continue;
                if (!tcp.Send(batch.Endpoints[i], batch.Packet(i))) Node.Counters.Drop(DropReason.UdpSend);
                batch.Length[i] = 0;
            }
        SendBatch(batch);
        batch.Count = 0;
    }

    // ---- TCP links (the loop's worker only) ----
    private PacketBatch? _tcpIn;
    private long _tcpNowMs;
    private Action<ReadOnlySpan<byte>, Endpoint>? _tcpDeliver;

    /// <summary>Works off a TCP link's readiness: its datagrams go through the node as if received
    /// on the socket, in batches, and what they become is written to the TUN (all under the lock:
    /// a fallback path, kept simple).</summary>
    internal void PumpTcp(TcpLinks tcp, int fd, long nowMs)
    {
        _tcpIn ??= new PacketBatch(Tune.BatchSize, Tune.SlotLen);
        _tcpDeliver ??= DeliverTcp;
        lock (Node.Gate)
        {
            Node.Sink = this;
            _tcpNowMs = nowMs;
            _tcpIn.Count = 0;
            tcp.OnReady(fd, nowMs, _tcpDeliver);
            ProcessTcp();
            FlushUdp(Node.UdpOut);
        }
    }

    private void DeliverTcp(ReadOnlySpan<byte> datagram, Endpoint from)
    {
        PacketBatch b = _tcpIn!;
        datagram.CopyTo(b.Slot(b.Count));
        b.Offset[b.Count] = 0;
        b.Length[b.Count] = datagram.Length;
        b.Endpoints[b.Count] = from;
        b.Count++;
        UdpDatagrams++;
        if (b.IsFull) ProcessTcp();
    }

    private void ProcessTcp()
    {
        PacketBatch b = _tcpIn!;
        if (b.Count == 0) return;
        Node.ProcessUdpBatch(b, _tcpNowMs);
        FlushUdp(Node.UdpOut);
        int refused = Tun.WriteBatch(b);
        if (refused > 0) Interlocked.Add(ref _tunWriteRefused, refused);
        b.Count = 0;
    }

    private void SendBatch(PacketBatch b)
    {
        int refused = Udp.SendBatch(b);
        if (refused > 0) Interlocked.Add(ref _udpSendRefused, refused);
    }
}

/// <summary>The daemon: sets up the interface and sockets, then runs the epoll loop until told to stop.</summary>
internal sealed unsafe partial class Daemon
{
    // How often the loop asks the chores thread to compare the config file's stamp: an edit applies
    // within two seconds without SIGHUP, and the stat runs off the loop.
    private const long ConfigCheckIntervalMs = 2_000;
    private volatile UpConfig _cfg;                     // replaced on the loop thread only; the chores thread reads it
    private readonly string[] _args;
    private readonly Log _log;
    private volatile bool _stop, _reloadAsked, _workerFailed;
    private int _wakeFd = -1, _stopFd = -1;             // _stopFd is never read: once written, every worker's epoll sees it
    internal readonly long StartedMs = Mono.NowMs();
    private Node? _node;
    private Worker? _worker;                            // the loop's own
    private TunDevice? _tun;
    private MgmtServer? _mgmt;
    private Resolver? _resolver;
    private PortMapper? _portMapper;
    private TcpLinks? _tcp;
    private Chores? _chores;
    private KernelRoutes? _kernelRoutes;                // the chores thread's once the loop runs
    private (DateTime, long) _configStamp;              // the chores thread's once the loop runs
    private volatile bool _configCheckQueued, _addressScanQueued;   // one of each waits at most
    private long _routesPostedVersion;

    internal Daemon(UpConfig cfg, string[] args, Log log) { _cfg = cfg; _args = args; _log = log; }

    private void Wake()
    {
        ulong one = 1;
        if (_wakeFd >= 0) Libc.Write(_wakeFd, (byte*)&one, 8);
    }

    internal void RequestStop()
    {
        _stop = true;
        Wake();
        ulong one = 1;
        if (_stopFd >= 0) Libc.Write(_stopFd, (byte*)&one, 8);
    }
    internal void RequestReload() { _reloadAsked = true; Wake(); }

    // What Run opens, for its finally to close: all of it is the loop thread's.
    private UdpSocket? _udp, _handshakes;
    private ControlServer? _control;
    private int _epfd = -1;
    private readonly List<PosixSignalRegistration> _signals = new();
    private readonly List<(TunDevice Tun, UdpSocket Udp)> _queues = new();   // the workers' beyond the first
    private readonly List<Thread> _threads = new();
    private Hooks? _hooks;
    private Sysctls? _sysctls;                       // what --fix-rp-filter and --exit changed, put back at exit
    private Gateway? _gateway;                       // --exit, --exit-node

    // Start to finish, in the order that matters: signal handlers first (SIGHUP's default action
    // would kill us), then everything that needs root (devices, netlink, sockets), then the drop of
    // privileges, then what runs as the user: resolver, chores, port mapping, the loop.
    internal int Run()
    {
        try
        {
            Open();
            if (_cfg.User != null) Privileges.Drop(_cfg.User, [_cfg.ControlPath]);
            return Serve();
        }
        finally { Close(); }
    }

    internal bool Hosted => _cfg.NetworkName != null;    // one network of several: the Host owns signals and --mgmt
    internal string ControlPath => _cfg.ControlPath;
    internal volatile StatusView? Status;                // set once the loop runs (the Host's /metrics reads it)
    private List<Worker> _workers = new();
    private bool _closed;

    /// <summary>The part that needs root: the node, signal handlers, devices, sockets, the event loop.</summary>
    internal void Open()
    {
        Node node = _node = new(_cfg, _log, new Counters());
        if (_cfg.ConfigPath != null)
            LoadInvites(node.Invites = new Invites(_cfg.PrivateKey) { Psk = _cfg.Psk, OwnSecretOf = k => node.FindPeer(k) is { OwnPsk: true } q ? q.Psk : null });
        if (_cfg.BeaconStore != null || _cfg.BeaconLoad != null)
        {
            _beaconKeys.Add(Beacon.KeyOf(_cfg.Psk));
            foreach (Key32 k in _cfg.AcceptPsks) _beaconKeys.Add(Beacon.KeyOf(k));
        }
        _cfg.PrivateKey.Clear();                          // the node holds its own copies from here on
        ClearSecrets(_cfg);
        LoadRevocations(node);
        _log.StartWriter();
        _log.Hooks = _hooks = new Hooks(_cfg.HookPrograms, _log);
        if (!Hosted)
        {
            foreach (PosixSignal sig in new[] { PosixSignal.SIGTERM, PosixSignal.SIGINT })
                _signals.Add(PosixSignalRegistration.Create(sig, ctx => { ctx.Cancel = true; RequestStop(); }));
            _signals.Add(PosixSignalRegistration.Create(PosixSignal.SIGHUP, ctx => { ctx.Cancel = true; RequestReload(); }));
        }
        _workers = OpenDataPath(node);
        OpenEventLoop(node);
    }

    /// <summary>The rest, as the configured user, until a signal or `veil down`; the exit code.</summary>
    internal int Serve()
    {
        Node node = _node!;
        List<Worker> workers = _workers;
        StartControlPlane(_udp!.LocalPort);
        var status = new StatusView(node, _cfg, _udp.LocalPort, StartedMs) { Workers = workers, Mapper = _portMapper, KernelRoutes = _kernelRoutes };
        Status = status;
        _log.Info("started", $"public_key={node.Handshaker.PublicKey.Short()} listen={_cfg.ListenAddress}:{_udp.LocalPort} tun={_tun!.Name} mtu={_cfg.Mtu} peers={node.Peers.Count} aead={node.Handshaker.PreferredAead}" +
            (_tcp?.ListenPort > 0 ? $" listen_tcp={_cfg.TcpListenAddress}:{_tcp.ListenPort}" : "") +
            (_mgmt != null ? $" mgmt={_cfg.MgmtAddress}:{_mgmt.Port}" : "") + (_cfg.User != null ? $" user={_cfg.User}" : ""));
        long nowMs = Mono.NowMs(), nextTimerMs;
        string? state = ReadState();
        lock (node.Gate)
        {
            node.Start(nowMs);
            if (_cfg.AddressAuto) node.Mesh.AutoAddressSinceMs = nowMs;
            if (state != null) ApplyState(node, state, nowMs);
            nextTimerMs = _worker!.PumpTimers(nowMs);
        }
        for (int i = 1; i < workers.Count; i++)
        {
            Worker w = workers[i];
            var thread = new Thread(() => RunWorker(w)) { IsBackground = true, Name = "veil-worker-" + i };
            thread.Start();
            _threads.Add(thread);
        }
        Loop(_epfd, workers, _control!, status, _udp.LocalPort, nextTimerMs);
        StopWorkers(_threads);
        lock (node.Gate)
        {
            node.Shutdown(Mono.NowMs());
            _worker.FlushUdp(node.UdpOut);
        }
        SaveState(force: true);
        SaveInvites(now: true);                       // a queued write may not run once the chores stop
        _log.Info("shutdown", $"reason=signal_or_down uptime_s={(Mono.NowMs() - StartedMs) / 1000}");
        return _workerFailed ? 1 : 0;
    }

    /// <summary>Closes whatever Open and Serve opened, in reverse; safe after a failure anywhere.</summary>
    internal void Close()
    {
        if (_closed) return;
        _closed = true;
        foreach (PosixSignalRegistration r in _signals) r.Dispose();
        _signals.Clear();
        _portMapper?.Dispose();                       // deletes the mapping: the socket is still ours
        _tcp?.Dispose();
        _chores?.Dispose();
        _resolver?.Dispose();
        _mgmt?.Dispose();
        _control?.Dispose();
        StopWorkers(_threads);
        foreach (var (t, u) in _queues) { t.Dispose(); u.Dispose(); }
        _queues.Clear();
        _tun?.Dispose();                              // closing the last queue removes the interface and its routes
        _gateway?.Dispose();
        _sysctls?.Restore();
        _handshakes?.Dispose();
        _udp?.Dispose();
        if (_stopFd >= 0) Libc.Close(_stopFd);
        if (_epfd >= 0) Libc.Close(_epfd);
        if (_wakeFd >= 0) Libc.Close(_wakeFd);
        _stopFd = _epfd = _wakeFd = -1;
        _node?.ClearKeys();
        _node?.Invites?.Clear();
        _log.Hooks = null;
        _hooks?.Dispose();
        _log.StopWriter();
    }

    // The devices and sockets, the interface up with its addresses and routes, and one worker per
    // TUN queue (the first is the loop's own).
    private List<Worker> OpenDataPath(Node node)
    {
        int wanted = _cfg.Workers > 0 ? _cfg.Workers : Tune.AutoWorkers(Environment.ProcessorCount);
        bool offloads = Environment.GetEnvironmentVariable("VEIL_OFFLOADS") != "off";
        if (_cfg.ExitNode != null) UdpSocket.FwMark = Gateway.FwMark;   // the tunnel's own packets bypass table 51820
        TunDevice tun = OpenDevices(wanted, offloads, _queues, out _udp);
        UdpSocket udp = _udp;
        _handshakes = OpenHandshakeQueue(udp, 1 + _queues.Count, offloads);
        var offloadsLine = new StringBuilder();
        foreach (var (name, on) in Worker.Offloads(tun, udp)) offloadsLine.Append(name).Append(on ? "=on " : "=off ");
        _log.Info("offloads", $"{offloadsLine}aead_backend={Aead.Backend}" + (offloads ? "" : " disabled_by=VEIL_OFFLOADS"));
        Netlink.SetLinkUp(tun.IfIndex, _cfg.Mtu);
        node.LocalMac = tun.Mac;
        KeepBridged();
        foreach (IfAddress a in _cfg.Addresses) Netlink.AddAddress(tun.IfIndex, a);
        // The journal is a crashed run's only while no daemon answers on its control socket.
        // (Another one's: we keep off it; we fail at the control socket soon anyway.)
        bool live = false;
        if (ControlClient.TryConnect(_cfg.ControlPath) is int fd) { Libc.Close(fd); live = true; }
        if (!live) Sysctls.Recover(Sysctls.JournalPath(_cfg.ControlPath), _log);
        _sysctls = new Sysctls(_log, live ? null : Sysctls.JournalPath(_cfg.ControlPath));
        // The kernel applies the larger of "all" and the interface's value: 2 on the TUN alone makes
        // its check loose while every other interface keeps its own (and the setting goes with the TUN).
        if (_cfg.FixRpFilter)
        {
            string all = Sysctls.Read(Sysctls.ConfPath("ipv4", "all", "rp_filter"));
            _sysctls.Set(Sysctls.ConfPath("ipv4", tun.Name, "rp_filter"), "2", was => was is "0" or "1" && (was == "1" || all == "1"), "fix_rp_filter");
        }
        if (_cfg.ExitNode != null) Gateway.RemoveRules();   // what a crashed --exit-node run left (another instance's stay)
        _gateway = new Gateway(tun.Name, tun.IfIndex, _cfg.Networks, _log);
        if (_cfg.Exit) _gateway.Offer(_sysctls);
        _gateway.Use(_cfg.ExitNode, _cfg.ExitAllowLan);
        if (_cfg.ExitNode != null) Gateway.ValidMarks(_sysctls, on: true);
        _kernelRoutes = new KernelRoutes(tun.IfIndex, _log) { DefaultRouteTable = _cfg.ExitNode != null ? Gateway.Table : Netlink.RT_TABLE_MAIN };
        _kernelRoutes.Sync(Prefixes(node.RouteList));
        _routesPostedVersion = node.RoutesVersion;
        if (_cfg.Cipher == "auto") node.Handshaker.ChooseCipher("auto");
        var workers = new List<Worker> { (_worker = new Worker(node, tun, udp) { Handshakes = _handshakes }) };
        foreach (var (t, u) in _queues) workers.Add(new Worker(node, t, u) { WakeLoop = Wake });
        _log.Info("workers", $"count={workers.Count} cpus={Environment.ProcessorCount}" + (workers.Count > 1 ? " tun=multi_queue udp=reuseport" : ""));
        return workers;
    }

    // The loop's epoll with its wake-up and stop eventfds, the control socket, the management
    // server and the TCP links: all bound while we are still root.
    private void OpenEventLoop(Node node)
    {
        _wakeFd = Libc.EventFd(0, Libc.EFD_NONBLOCK | Libc.EFD_CLOEXEC);
        _stopFd = Libc.EventFd(0, Libc.EFD_NONBLOCK | Libc.EFD_CLOEXEC);
        _epfd = Libc.EpollCreate1(Libc.EPOLL_CLOEXEC);
        if (_wakeFd < 0 || _stopFd < 0 || _epfd < 0) throw new IOException($"cannot create the event loop: {Libc.ErrorText(Libc.Errno)}");
        _control = ControlServer.Listen(_cfg.ControlPath, _epfd, this);
        if (_cfg.MgmtAddress != null && !Hosted)
        {
            _mgmt = MgmtServer.Listen(_cfg.MgmtAddress, _cfg.MgmtPort, _epfd, _cfg.MgmtAcl);
            _mgmt.HealthzGraceMs = _cfg.HealthzGraceMs;
        }
        Libc.EpollAdd(_epfd, _tun!.Fd);
        Libc.EpollAdd(_epfd, _udp!.Fd);
        if (_handshakes != null) Libc.EpollAdd(_epfd, _handshakes.Fd);
        Libc.EpollAdd(_epfd, _wakeFd);
        if (_cfg.TcpListenAddress != null || _cfg.Peers.Exists(pc => pc.Tcp.IsSet))
        {
            _tcp = new TcpLinks(_epfd);
            if (_cfg.TcpListenAddress != null) _tcp.Listen(_cfg.TcpListenAddress, _cfg.TcpListenPort);
            node.Tcp = _tcp;
            node.LastUdpRxMs = Mono.NowMs();           // UDP gets its chance first
        }
    }

    // The threads and watchers that run beside the loop, as the configured user.
    private void StartControlPlane(int port)
    {
        _resolver = new Resolver(Wake);
        _resolver.SetNames(EndpointNames(_cfg));
        _configStamp = ConfigStamp();
        _appliedText = _confirmedText = ReadConfigText();
        ApplyLocalEndpoints(FindLocalEndpoints(port));
        _chores = new Chores(Wake, _log);
        if (_cfg.PortMapping)
        {
            Chores chores = _chores;
            _portMapper = new PortMapper(port, ep => chores.Return(() => ApplyMapped(ep)), _log,
                PortMapper.Protocols(Environment.GetEnvironmentVariable("VEIL_PORTMAP")));
        }
    }

    // The socket and the TUN, and for each further worker a TUN queue and a sibling socket (as many
    // as the kernel gives: a worker without its pair would swallow the flows hashed to it).
    // VEIL_OFFLOADS=off runs the data path as on a kernel without offloads (a plain TUN, one
    // datagram per send and per receive): to compare, and a way out should a driver mishandle them.
    private TunDevice OpenDevices(int wanted, bool offloads, List<(TunDevice Tun, UdpSocket Udp)> queues, out UdpSocket udp)
    {
        udp = UdpSocket.Bind(_cfg.ListenAddress, _cfg.ListenPort, reusePort: true);   // the handshake queue joins it
        udp.OnOffloadOff = what => _log.Warn("offload_off", what + " hint=\"sending one datagram per call from now on\"");
        if (!offloads) udp.DropOffloads();

        ulong mac = _cfg.Mode != L2Mode.Tun ? TunDevice.MacFor(_cfg.PublicKey) : 0;
        TunDevice tun = _tun = TunDevice.Create(_cfg.TunName, offloads, multiQueue: wanted > 1, mac);
        for (int i = 1; i < wanted; i++)
        {
            TunDevice? queue = null;
            try
            {
                queue = TunDevice.Create(_cfg.TunName, offloads, multiQueue: true, mac);
                UdpSocket socket = udp.Sibling();
                if (!offloads) socket.DropOffloads();
                queues.Add((queue, socket));
            }
            catch (IOException e)
            {
                queue?.Dispose();                      // an open queue nobody reads would swallow the flows hashed to it
                _log.Warn("workers_limited", $"workers={i} wanted={wanted} error=\"{e.Message}\"");
                break;
            }
        }
        return tun;
    }

    // Handshakes get a socket of their own on the same port, read by the loop after the records
    // (HandshakeSteering): a hello flood then costs the data path CPU only, not its queue. Without
    // the kernel's help (no SO_ATTACH_REUSEPORT_CBPF) the port is served as before, all on the workers'.
    private UdpSocket? OpenHandshakeQueue(UdpSocket udp, int workers, bool offloads)
    {
        UdpSocket? q = null;
        try
        {
            q = udp.Sibling();
            if (!offloads) q.DropOffloads();
            if (udp.SteerHandshakes(workers)) return q;
            _log.Warn("handshake_queue_off", $"error=\"{Libc.ErrorText(Libc.Errno)}\" hint=\"handshakes share the records' socket: a hello flood can crowd records out\"");
        }
        catch (IOException e) { _log.Warn("handshake_queue_off", $"error=\"{e.Message}\""); }
        q?.Dispose();
        return null;
    }

    // The first worker's loop: its packets, the control socket and the management endpoint, the
    // chores' results, then under the node's lock the timers and what other threads left for it.
    // A wake-up that only carried packets, before any deadline and with nothing signalled, goes
    // straight back to epoll: an idle tunnel's round trip is four such wake-ups, and they allocate
    // nothing (a gen0 collection is a pause every packet would wait behind).
    private void Loop(int epfd, List<Worker> workers, ControlServer control, StatusView status, int port, long nextTimerMs)
    {
        Node node = _node!;
        Worker worker = workers[0];
        long nowMs = Mono.NowMs();
        long nextConfigCheckMs = nowMs + ConfigCheckIntervalMs;
        long nextAddressScanMs = nowMs + Tune.ExchangeIntervalMs;
        byte* events = stackalloc byte[16 * 16];
        while (!_stop)
        {
            nowMs = Mono.NowMs();
            long wake = Math.Min(Math.Min(nextTimerMs, Math.Min(control.NextDeadlineMs, _mgmt?.NextDeadlineMs ?? long.MaxValue)),
                Math.Min(nextAddressScanMs, _cfg.ConfigPath != null ? nextConfigCheckMs : long.MaxValue));
            if (_tcp != null && _tcp.Count > 0) wake = Math.Min(wake, nowMs + 1000);   // TcpLinks.Expire's deadlines
            if (_cfg.BeaconStore != null || _cfg.BeaconLoad != null) wake = Math.Min(wake, _nextBeaconMs);
            if (_rollbackAtMs != 0) wake = Math.Min(wake, _rollbackAtMs);
            int n = Libc.EpollWait(epfd, events, 16, (int)Math.Clamp(wake - nowMs, 0, 60_000));
            nowMs = Mono.NowMs();
            // The first worker's own I/O (it locks the node itself), then the control socket and
            // the management endpoint (they lock it for what they read).
            bool housekeep = nowMs >= wake;
            for (int i = 0; i < n; i++)
            {
                int fd = Libc.EpollEventFd(events, i);
                if (worker.Drain(fd, nowMs)) continue;
                housekeep = true;
                if (_tcp != null && _tcp.Owns(fd)) worker.PumpTcp(_tcp, fd, nowMs);
                else if (control.Owns(fd)) control.OnReady(fd, nowMs, status);
                else if (fd == _wakeFd) { ulong v; Libc.Read(_wakeFd, (byte*)&v, 8); }
                else _mgmt?.OnReady(fd, nowMs, status);
            }
            // A timer armed earlier than the loop's next wake-up, or a change the loop acts on
            // (LoopSignal): set by this thread's packets, or by another worker, which also wakes us.
            if (!housekeep && !Volatile.Read(ref node.Signal.Pending)) continue;
            nextTimerMs = Housekeep(workers, control, port, nowMs, ref nextConfigCheckMs, ref nextAddressScanMs);
        }
    }

    // The loop's work besides packets; returns when the node's timers are due next.
    private long Housekeep(List<Worker> workers, ControlServer control, int port, long nowMs, ref long nextConfigCheckMs, ref long nextAddressScanMs)
    {
        Node node = _node!;
        Chores chores = _chores!;
        while (chores.TryTakeResult(out Action? done)) done();
        if (_tcp != null) ExpireTcp(nowMs);
        if (_reloadAsked) { _reloadAsked = false; AskReload("signal", null); }
        if (_rollbackAtMs != 0 && nowMs >= _rollbackAtMs) RollBack();
        if (_cfg.ConfigPath != null && nowMs >= nextConfigCheckMs)
        {
            nextConfigCheckMs = nowMs + ConfigCheckIntervalMs;
            if (!_configCheckQueued) { _configCheckQueued = true; chores.Post(CheckConfigFile); }
        }
        if (nowMs >= nextAddressScanMs)
        {
            nextAddressScanMs = nowMs + Tune.ExchangeIntervalMs;
            if (!_addressScanQueued) { _addressScanQueued = true; chores.Post(() => ScanAddresses(port)); }
            if (_cfg.Bridge != null) chores.Post(KeepBridged);
            SaveState(force: false);
        }
        if ((_cfg.BeaconStore != null || _cfg.BeaconLoad != null) && nowMs >= _nextBeaconMs)
        {
            bool early = nowMs - StartedMs < FirstBeaconStoreMs;
            _nextBeaconMs = early ? StartedMs + FirstBeaconStoreMs : nowMs + BeaconIntervalMs;
            BeaconRound(store: !early);
        }
        control.Expire(nowMs);
        _mgmt?.Expire(nowMs);
        List<RouteEntry>? routes = null;
        List<Invites.Joiner>? joiners = null;
        List<Revocation>? unverified = null;
        long nextTimerMs;
        lock (node.Gate)
        {
            foreach (Worker w in workers) w.Settle();
            while (_resolver!.TryTake(out var resolved)) ApplyResolved(resolved.Text, resolved.At, nowMs);
            nextTimerMs = workers[0].PumpTimers(nowMs);
            if (node.RoutesVersion != _routesPostedVersion) { _routesPostedVersion = node.RoutesVersion; routes = node.RouteList; }
            while (node.Invites != null && node.Invites.Joiners.TryDequeue(out Invites.Joiner? j)) (joiners ??= new()).Add(j);
            if (node.Mesh.Unverified.Count > 0) unverified = node.Mesh.TakeUnverified();
            if (node.Mesh.MoveAddress is var (by, claim)) { node.Mesh.MoveAddress = null; PostAddressMove(by, claim); }
        }
        if (unverified != null) chores.Post(() => CheckRevocations(unverified));
        // Handed over finished: RouteList is replaced whole, never changed, when routes change.
        if (routes != null) { KernelRoutes kernelRoutes = _kernelRoutes!; chores.Post(() => kernelRoutes.Sync(Prefixes(routes))); }
        if (joiners != null) foreach (Invites.Joiner j in joiners) chores.Post(() => WriteJoiner(j));
        return nextTimerMs;
    }

    // A worker beyond the first: its own epoll over its TUN queue and socket, until stopped.
    private void RunWorker(Worker w)
    {
        int ep = Libc.EpollCreate1(Libc.EPOLL_CLOEXEC);
        try
        {
            if (ep < 0) throw new IOException($"cannot create a worker's event loop: {Libc.ErrorText(Libc.Errno)}");
            Libc.EpollAdd(ep, w.Tun.Fd);
            Libc.EpollAdd(ep, w.Udp.Fd);
            Libc.EpollAdd(ep, _stopFd);
            byte* events = stackalloc byte[16 * 4];
            while (!_stop)
            {
                int n = Libc.EpollWait(ep, events, 4, -1);
                long nowMs = Mono.NowMs();
                for (int i = 0; i < n; i++) w.Drain(Libc.EpollEventFd(events, i), nowMs);
            }
        }
        catch (Exception e)
        {
            _log.Error("worker_failed", $"error=\"{e.Message}\"");
            _workerFailed = true;
            RequestStop();
        }
        finally
        {
            if (ep >= 0) Libc.Close(ep);
        }
    }

    private void StopWorkers(List<Thread> threads)
    {
        if (threads.Count == 0) return;
        RequestStop();
        foreach (Thread t in threads) t.Join((int)Tune.ShutdownGraceMs);
        threads.Clear();
    }

    private static string[] EndpointNames(UpConfig cfg)
    {
        var names = new List<string>();
        foreach (PeerConfig p in cfg.Peers)
            if (Endpoint.TrySplitHostPort(p.EndpointText, out string host, out _) && !IPAddress.TryParse(host, out _)) names.Add(p.EndpointText);
        return names.ToArray();
    }

    // A peer whose name just resolved: used if it had no address yet, or has been silent long
    // enough that its old address is probably stale (dynamic DNS); a live peer keeps roaming.
    private void ApplyResolved(string text, Endpoint at, long nowMs)
    {
        foreach (Peer p in _node!.Peers)
        {
            if (!p.Active || p.ConfiguredEndpoint != text || p.Endpoint.Equals(at)) continue;
            bool silent = p.LastRxMs < 0 || nowMs - p.LastRxMs > Spec.KeepaliveTimeoutMs + Spec.RekeyTimeoutMs;
            if (p.Endpoint.IsSet && !silent) continue;
            p.Endpoint = at;
            _log.Info("endpoint_resolved", $"peer={p.Name} name={text} endpoint={at}");
            if (!p.HasReadySession(nowMs, Spec.RejectAfterTimeMs)) _node.StartHandshake(p, nowMs, retransmit: false);
        }
    }

    private string? ReadConfigText()
    {
        try { return _cfg.ConfigPath != null ? File.ReadAllText(_cfg.ConfigPath) : null; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return null; }
    }

    private (DateTime, long) ConfigStamp()
    {
        if (_cfg.ConfigPath == null) return default;
        var fi = new FileInfo(_cfg.ConfigPath);
        return fi.Exists ? (fi.LastWriteTimeUtc, fi.Length) : default;
    }

    // A TAP's overlay is one link: its addresses' own prefixes reach every member, and no route is ours.
    private List<IpPrefix> Prefixes(List<RouteEntry> routes) => _cfg.Mode != L2Mode.Tun ? [] : routes.ConvertAll(r => r.Prefix);

    // Where members may reach us: the --listen address, or every address of this host but
    // loopback, link-local, the overlay and the TUN itself, each with our port.
    private List<Endpoint> FindLocalEndpoints(int port)
    {
        var found = new List<Endpoint>();
        bool any = _cfg.ListenAddress.Equals(IPAddress.Any) || _cfg.ListenAddress.Equals(IPAddress.IPv6Any);
        if (!any) found.Add(Endpoint.FromIp(_cfg.ListenAddress, port));
        else
        {
            try
            {
                foreach (var nic in System.Net.NetworkInformation.NetworkInterface.GetAllNetworkInterfaces())
                {
                    if (nic.Name == _cfg.TunName || nic.OperationalStatus == System.Net.NetworkInformation.OperationalStatus.Down) continue;
                    foreach (var ua in nic.GetIPProperties().UnicastAddresses)
                    {
                        IPAddress ip = ua.Address;
                        if (IPAddress.IsLoopback(ip) || ip.IsIPv6LinkLocal || ip.IsIPv6Multicast || ip.IsIPv4MappedToIPv6) continue;
                        var host = new IpPrefix(ip.GetAddressBytes(), ip.AddressFamily == AddressFamily.InterNetworkV6 ? 128 : 32);
                        if (_cfg.Networks.Exists(n => n.Covers(host))) continue;
                        if (found.Count < Tune.MaxEndpointsPerMember - 2) found.Add(Endpoint.FromIp(ip, port));
                    }
                }
            }
            catch (System.Net.NetworkInformation.NetworkInformationException e)
            {
                _log.Warn("addresses_unknown", $"error=\"{e.ErrorCode}\" hint=\"members will know this node only by the address they see it at\"");
            }
        }
        return found;
    }

    private void ApplyLocalEndpoints(List<Endpoint> found)
    {
        Node node = _node!;
        lock (node.Gate)
        {
            bool changed = found.Count != node.Mesh.LocalEndpoints.Count || !found.TrueForAll(node.Mesh.LocalEndpoints.Contains);
            if (!changed) return;
            node.Mesh.LocalEndpoints.Clear();
            node.Mesh.LocalEndpoints.AddRange(found);
            node.ScheduleExchange(Mono.NowMs());
        }
    }

    /// <summary>Replaces path with text atomically: a new file (0600) written and synced beside it,
    /// then renamed; a failure is logged as `failed` and leaves the old file as it was.</summary>
    internal static void WriteAtomically(string path, string text, Log log, string failed)
    {
        string tmp = path + ".new";
        try
        {
            var options = new FileStreamOptions { Mode = FileMode.Create, Access = FileAccess.Write, UnixCreateMode = (UnixFileMode)0b110_000_000 };
            using (var fs = new FileStream(tmp, options))
            {
                fs.Write(Encoding.UTF8.GetBytes(text));
                fs.Flush(flushToDisk: true);
            }
            File.Move(tmp, path, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            log.Warn(failed, $"file={path} error=\"{e.Message}\"");
            try { File.Delete(tmp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        }
    }

    private readonly List<Endpoint> _tcpGone = new();

    private void ExpireTcp(long nowMs)
    {
        Node node = _node!;
        lock (node.Gate)
        {
            _tcpGone.Clear();
            _tcp!.Expire(nowMs, _tcpGone);
            foreach (Endpoint e in _tcpGone) node.TcpGone(e, nowMs);
        }
    }

    // On the chores thread: listing the NICs reads /proc and /sys.
    // --bridge: at start, then with every address scan (on the chores thread), since netifd or
    // an operator rebuilding the bridge drops its ports; a bridge that is not there yet is waited for.
    private string? _bridgeError;
    private void KeepBridged()
    {
        if (_cfg.Bridge is not string bridge || _tun == null || Netlink.MasterOf(_tun.Name) == bridge) return;
        int errno = Netlink.AddToBridge(bridge, _tun.IfIndex);
        string? error = errno == 0 ? null : errno == 19 ? "no such bridge" : Libc.ErrorText(errno);   // 19: ENODEV
        if (error == null) _log.Info("bridge_joined", $"bridge={bridge} tun={_tun.Name}");
        else if (error != _bridgeError) _log.Warn("bridge_failed", $"bridge={bridge} tun={_tun.Name} error=\"{error}\" hint=\"retried every {Tune.ExchangeIntervalMs / 1000} s\"");
        _bridgeError = error;
    }

    private void ScanAddresses(int port)
    {
        _addressScanQueued = false;
        List<Endpoint> found = FindLocalEndpoints(port);
        _chores!.Return(() => ApplyLocalEndpoints(found));
    }

    // A config's copies of the network secrets, once the node holds its own.
    private static void ClearSecrets(UpConfig c)
    {
        c.Psk.Clear();
        foreach (PeerConfig pc in c.Peers) pc.Psk.Clear();
        for (int i = 0; i < c.AcceptPsks.Length; i++) c.AcceptPsks[i].Clear();
    }

    /// <summary>`veil set exit-node NAME|off`: the policy rules, the LAN masquerade, the sockets'
    /// mark and the table of default routes change on the chores thread (netlink); then the mesh
    /// takes the new exit's default routes (from what it announced) and drops the old one's.</summary>
    internal void SetExitNode(string arg, Action<string> answer)
    {
        string? next = arg == "off" ? null : arg;
        Node node = _node!;
        if (_cfg.Exit) { answer("error: this node is an exit (--exit): it uses none\n"); return; }
        if (next != null && !UpConfig.IsName(next) && !Key32.TryParseBase64(next, out _)) { answer($"error: '{arg}' is not a peer name or public key (or off)\n"); return; }
        lock (node.Gate)
        {
            Peer? exit = next != null ? node.Peers.Find(p => p.Active && p.Is(next)) : null;
            if (next != null && exit == null)
            {
                answer($"error: no peer named {next} (see 'veil peers'); the exit node is unchanged\n");
                return;
            }
            // Up and heard from, yet no default route in what it announces: it is no exit for us.
            if (exit is { Up: true, SelfHeard: true } && exit.DefaultClaims.Count == 0)
            {
                answer($"error: {next} offers no exit to this node (it announces no default route: no --exit, or its --exit-for leaves this node out); the exit node is unchanged\n");
                return;
            }
        }
        if (next == _cfg.ExitNode) { answer(next == null ? "ok: no exit node (unchanged)\n" : $"ok: exit node {next} (unchanged)\n"); return; }
        bool allowLan = _cfg.ExitAllowLan;
        SwitchExit(next, allowLan, error =>
        {
            if (error != null) { answer($"error: {error}; the exit node is unchanged\n"); return; }
            lock (node.Gate)
            {
                _cfg.ExitNode = next;
                node.Mesh.ExitNode = next;
                node.ExitChanged();
            }
            _log.Info("exit_node_changed", $"exit_node={next ?? "off"}");
            answer(next == null ? "ok: no exit node\n" : $"ok: exit node {next}\n");
        }, allowLan);
    }

    // On the chores thread; done runs on the loop (null: switched). A failure leaves the old choice.
    private void SwitchExit(string? next, bool allowLan, Action<string?> done, bool oldAllowLan)
    {
        _chores!.Post(() =>
        {
            string? old = _gateway!.ExitNode, error = null;   // read here: an earlier switch has finished
            try { _gateway.Use(next, allowLan); Gateway.ValidMarks(_sysctls!, on: next != null); }
            catch (IOException e)
            {
                error = e.Message;
                try { _gateway.Use(old, oldAllowLan); } catch (IOException) { }
            }
            if (error == null)
            {
                uint mark = next != null ? Gateway.FwMark : 0;
                UdpSocket.FwMark = mark;
                foreach (UdpSocket u in AllUdp()) u.SetMark(mark);
                _kernelRoutes!.DefaultRouteTable = next != null ? Gateway.Table : Netlink.RT_TABLE_MAIN;
            }
            _chores.Return(() => done(error));
        });
    }

    private IEnumerable<UdpSocket> AllUdp()
    {
        if (_udp != null) yield return _udp;
        if (_handshakes != null) yield return _handshakes;
        foreach (var (_, u) in _queues) yield return u;
    }

    /// <summary>`ping PEER` on the control socket: PEER by name, public key or its first characters.
    /// The Pong is answered on the loop's thread (through the chores' queue): the control socket is
    /// the loop's, and the Pong may arrive on another worker.</summary>
    internal void Ping(string request, Action<byte[]> later)
    {
        string who = request["ping ".Length..].Trim();
        Chores chores = _chores!;
        void Answer(string line) => chores.Return(() => later(Encoding.UTF8.GetBytes(line)));
        lock (_node!.Gate)
        {
            Peer? p = null;
            int matches = 0;
            foreach (Peer q in _node.Peers)
                if (q.Active && (q.Name == who || who.Length >= 4 && q.PublicKey.ToBase64().StartsWith(who, StringComparison.Ordinal))) { p = q; matches++; }
            if (matches != 1) { Answer(matches == 0 ? $"error: no peer named '{who}' (see 'veil peers')\n" : $"error: '{who}' names {matches} peers\n"); return; }
            _node.Ping(p!, Mono.NowMs(), Answer);
            _worker!.FlushUdp(_node.UdpOut);
        }
    }

    internal enum ReloadCode { Ok = 0, Rejected = 2, NeedsRestart = 3 }

    /// <summary>A reload read and checked, not yet applied (Next is null unless Code is Ok).</summary>
    private sealed record PreparedReload(string Trigger, ReloadCode Code, string Message, UpConfig? Next, string? Text = null);

    // Safe remote changes (`veil reload --confirm SECONDS`, like Junos' commit confirmed): the window
    // opens with the config file's text as it runs now (_confirmedText); what is applied while it is
    // open (that reload, SIGHUP, file edits) is rolled back to that text unless `veil confirm` comes
    // before _rollbackAtMs. Outside a window every applied text is confirmed at once. Loop thread.
    private string? _appliedText, _confirmedText;
    private long _rollbackAtMs;                         // 0: no window open

    // On the loop thread, from the control socket: "reload confirm SECONDS".
    internal void AskReloadConfirmed(long windowMs, Action<ReloadCode, string> answer)
    {
        if (_cfg.ConfigPath == null) { answer(ReloadCode.Rejected, "reload --confirm needs a daemon started with --config FILE (the file is what rolls back)"); return; }
        bool opened = _rollbackAtMs == 0;
        if (opened) _confirmedText = _appliedText;
        _rollbackAtMs = Mono.NowMs() + windowMs;
        _log.Info("confirm_window", $"seconds={windowMs / 1000} hint=\"veil confirm keeps the changes; without it they are rolled back\"");
        AskReload("control", (code, message) =>
        {
            if (code != ReloadCode.Ok && opened) _rollbackAtMs = 0;       // nothing was applied: no window
            answer(code, code == ReloadCode.Ok ? $"{message}; confirm within {windowMs / 1000} s with 'veil confirm', or the config goes back to what ran before" : message);
        });
    }

    internal string Confirm()
    {
        if (_rollbackAtMs == 0) return "error: nothing to confirm (no 'veil reload --confirm' window is open)\n";
        _rollbackAtMs = 0;
        _confirmedText = _appliedText;
        _log.Info("confirmed", "hint=\"the changes stay\"");
        return "ok: confirmed; the running config stays\n";
    }

    // On the loop thread, when the window ran out: the file goes back and is applied again.
    private void RollBack()
    {
        _rollbackAtMs = 0;
        string? text = _confirmedText;
        string path = _cfg.ConfigPath!;
        if (text == null) return;
        _log.Warn("reload_rolled_back", "reason=not_confirmed hint=\"the config file holds what ran before the window opened\"");
        _chores!.Post(() =>
        {
            try { Onboarding.WriteAtomic(path, text, File.GetUnixFileMode(path)); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { _log.Error("rollback_failed", $"error=\"{e.GetType().Name}\""); return; }
            PreparedReload r = PrepareReload("rollback");
            _chores.Return(() => CommitReload(r));
        });
    }

    /// <summary>Re-reads flags and file on the chores thread (names in it resolve there, which may
    /// take seconds), then applies the reloadable keys on the loop, or nothing at all; answer hears
    /// how it went.</summary>
    internal void AskReload(string trigger, Action<ReloadCode, string>? answer)
    {
        _chores!.Post(() =>
        {
            PreparedReload r = PrepareReload(trigger);
            _chores.Return(() =>
            {
                var (code, message) = CommitReload(r);
                answer?.Invoke(code, message);
            });
        });
    }

    // On the chores thread: a poll found the file changed.
    private void CheckConfigFile()
    {
        _configCheckQueued = false;
        if (ConfigStamp() == _configStamp) return;
        PreparedReload r = PrepareReload("file_changed");
        _chores!.Return(() => CommitReload(r));
    }

    private PreparedReload PrepareReload(string trigger)
    {
        _configStamp = ConfigStamp();
        UpConfig running = _cfg, next;
        string? text = ReadConfigText();
        try { next = UpConfig.Load(_args, 1, running); }
        catch (ConfigException e)
        {
            _log.Warn("reload_rejected", $"trigger={trigger} error=\"{e.Message}\" hint=\"the running config is unchanged\"");
            return new(trigger, ReloadCode.Rejected, e.Message, null);
        }
        List<string> changed = running.RestartKeysChanged(next);
        if (changed.Count == 0) return new(trigger, ReloadCode.Ok, "", next, text);
        ClearSecrets(next);
        string keys = string.Join(", ", changed);
        _log.Warn("reload_needs_restart", $"trigger={trigger} keys=\"{keys}\" hint=\"nothing was applied\"");
        return new(trigger, ReloadCode.NeedsRestart, $"changing {keys} needs a restart; nothing was applied", null);
    }

    // On the loop thread; the kernel's routes follow on the loop's next turn (RoutesVersion).
    private (ReloadCode Code, string Message) CommitReload(PreparedReload r)
    {
        if (r.Next is not UpConfig next) return (r.Code, r.Message);
        Node node = _node!;
        int peers;
        string? oldExit = _cfg.ExitNode;
        bool oldLan = _cfg.ExitAllowLan, switching = next.ExitNode != oldExit || next.ExitAllowLan != oldLan;
        // The mesh takes the new exit only once its rules are in (SwitchExit's answer).
        if (switching)
            SwitchExit(next.ExitNode, next.ExitAllowLan, error =>
            {
                lock (node.Gate)
                {
                    if (error == null) node.Mesh.ExitNode = next.ExitNode;
                    else { _cfg.ExitNode = oldExit; _cfg.ExitAllowLan = oldLan; }
                    node.ExitChanged();
                }
                if (error != null) _log.Error("exit_node_not_changed", $"exit_node={next.ExitNode ?? "off"} error=\"{error}\" kept={oldExit ?? "off"}");
                else _log.Info("exit_node_changed", $"exit_node={next.ExitNode ?? "off"} trigger=reload");
            }, oldLan);
        lock (node.Gate)
        {
            node.Apply(next, Mono.NowMs());
            if (switching) { node.Mesh.ExitNode = oldExit; node.ExitChanged(); }
            _worker!.FlushUdp(node.UdpOut);
            peers = node.Peers.FindAll(p => p.Active).Count;
        }
        ClearSecrets(next);
        _log.Level = next.LogLevel;
        _log.Json = next.LogJson;
        _log.NoTimestamps = next.LogNoTimestamps;
        _mgmt?.SetAcl(next.MgmtAcl);
        if (_mgmt != null) _mgmt.HealthzGraceMs = next.HealthzGraceMs;
        _hooks?.SetPrograms(next.HookPrograms);
        _resolver?.SetNames(EndpointNames(next));
        _cfg = next;
        _appliedText = r.Text;
        if (_rollbackAtMs == 0) _confirmedText = r.Text;
        _log.Info("reloaded", $"trigger={r.Trigger} peers={peers}");
        return (ReloadCode.Ok, $"reloaded: {peers} peers");
    }
}

/// <summary>Resolves peer endpoint names off the loop (a lookup can block for seconds): every
/// ResolveIntervalMs it resolves each name and queues the answers; the loop applies them. Names
/// that did not resolve at start-up and dynamic-DNS peers that went quiet get their new address.</summary>
internal sealed class Resolver : IDisposable
{
    // A dynamic-DNS peer that moved is found within ten seconds, at six lookups a minute per name.
    private const int ResolveIntervalMs = 10_000;
    private readonly System.Collections.Concurrent.ConcurrentQueue<(string Text, Endpoint At)> _results = new();
    private readonly AutoResetEvent _kick = new(false);
    private readonly Action _wake;
    private volatile string[] _names = [];
    private volatile bool _stop;
    private readonly Thread _thread;

    internal Resolver(Action wake)
    {
        _wake = wake;
        _thread = new Thread(Run) { IsBackground = true, Name = "veil-resolver" };
        _thread.Start();
    }

    internal static IPAddress? TryResolve(string host)
    {
        try
        {
            IPAddress[] found = Dns.GetHostAddresses(host);
            return found.Length > 0 ? found[0] : null;
        }
        catch (Exception e) when (e is SocketException or ArgumentException) { return null; }
    }

    /// <summary>The HOST:PORT texts to keep resolving (literal addresses are left out by the caller).</summary>
    internal void SetNames(string[] names)
    {
        _names = names;
        _kick.Set();
    }

    internal bool TryTake(out (string Text, Endpoint At) result) => _results.TryDequeue(out result);

    private void Run()
    {
        while (!_stop)
        {
            foreach (string text in _names)
                if (Endpoint.TrySplitHostPort(text, out string host, out int port) && TryResolve(host) is IPAddress ip)
                    _results.Enqueue((text, Endpoint.FromIp(ip, port)));
            if (!_results.IsEmpty) _wake();
            _kick.WaitOne(ResolveIntervalMs);
        }
    }

    public void Dispose()
    {
        _stop = true;
        _kick.Set();
    }
}

/// <summary>The daemon's slow work, on a thread of its own so that neither the loop nor the node's
/// lock ever waits for it: reading the config file (its peer names resolve through DNS), appending a
/// joiner and syncing the file, listing the host's addresses, syncing kernel routes over netlink. A
/// job runs here and hands back what the loop must do with its result (Return); jobs run one at a
/// time, in the order posted, so route syncs and reloads never overtake each other.</summary>
internal sealed class Chores : IDisposable
{
    private readonly System.Collections.Concurrent.ConcurrentQueue<Action> _jobs = new(), _results = new();
    private readonly AutoResetEvent _posted = new(false);
    private readonly Action _wakeLoop;
    private readonly Log _log;
    private readonly Thread _thread;
    private volatile bool _stop;

    internal Chores(Action wakeLoop, Log log)
    {
        _wakeLoop = wakeLoop;
        _log = log;
        _thread = new Thread(Run) { IsBackground = true, Name = "veil-chores" };
        _thread.Start();
    }

    internal void Post(Action job)
    {
        _jobs.Enqueue(job);
        _posted.Set();
    }

    /// <summary>Called by a job: the loop runs result on its own thread, soon.</summary>
    internal void Return(Action result)
    {
        _results.Enqueue(result);
        _wakeLoop();
    }

    internal bool TryTakeResult([System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out Action? result) => _results.TryDequeue(out result);

    private void Run()
    {
        while (!_stop)
        {
            _posted.WaitOne();
            while (!_stop && _jobs.TryDequeue(out Action? job))
            {
                try { job(); }
                catch (Exception e)                        // a bug in one chore must not take the daemon down
                {
                    _log.Error("chore_failed", $"error=\"{e.GetType().Name}: {e.Message}\"");
                }
            }
        }
    }

    /// <summary>Lets the job at hand finish (a route sync, a file write), within the shutdown grace.</summary>
    public void Dispose()
    {
        _stop = true;
        _posted.Set();
        _thread.Join((int)Tune.ShutdownGraceMs);
    }
}

/// <summary>--user: give up root once the TUN and sockets exist, keeping CAP_NET_ADMIN for routes.</summary>
internal static unsafe partial class Privileges
{
    private const int PR_SET_KEEPCAPS = 8, CAP_NET_ADMIN = 12;
    private const uint LinuxCapabilityVersion3 = 0x20080522;

    [LibraryImport("libc", EntryPoint = "getpwnam", SetLastError = true)] private static partial nint GetPwNam(byte* name);
    [LibraryImport("libc", EntryPoint = "prctl", SetLastError = true)] private static partial int Prctl(int option, nuint arg2, nuint arg3, nuint arg4, nuint arg5);
    [LibraryImport("libc", EntryPoint = "setgroups", SetLastError = true)] private static partial int SetGroups(nuint size, uint* list);
    [LibraryImport("libc", EntryPoint = "setresgid", SetLastError = true)] private static partial int SetResGid(uint r, uint e, uint s);
    [LibraryImport("libc", EntryPoint = "setresuid", SetLastError = true)] private static partial int SetResUid(uint r, uint e, uint s);
    [LibraryImport("libc", EntryPoint = "capset", SetLastError = true)] private static partial int CapSet(uint* header, uint* data);
    [LibraryImport("libc", EntryPoint = "chown", SetLastError = true)] private static partial int Chown(byte* path, uint uid, uint gid);

    /// <summary>struct passwd: pw_name, pw_passwd (pointers), then pw_uid, pw_gid (32-bit).</summary>
    internal static bool TryLookup(string user, out uint uid, out uint gid)
    {
        uid = gid = 0;
        byte[] name = Encoding.UTF8.GetBytes(user + "\0");
        fixed (byte* n = name)
        {
            nint pw = GetPwNam(n);
            if (pw == 0) return false;
            uid = *(uint*)(pw + 2 * sizeof(nint));
            gid = *(uint*)(pw + 2 * sizeof(nint) + 4);
            return true;
        }
    }

    internal static void Drop(string user, string[] controlPaths)
    {
        if (!TryLookup(user, out uint uid, out uint gid)) throw new IOException($"--user '{user}': no such user");
        foreach (string controlPath in controlPaths)
        {
            byte[] path = Encoding.UTF8.GetBytes(controlPath + "\0");
            fixed (byte* p = path) Chown(p, uid, gid);   // so the unprivileged daemon can still remove it
        }
        // The order matters: KEEPCAPS before setresuid, or leaving uid 0 clears every capability; groups and
        // gid before uid, since only root may change them. Real, effective and saved ids all change, so
        // root cannot be taken back.
        if (Prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0 || SetGroups(0, null) < 0 || SetResGid(gid, gid, gid) < 0 || SetResUid(uid, uid, uid) < 0)
            throw new IOException($"--user '{user}': cannot switch user: {Libc.ErrorText(Libc.Errno)}");
        uint* header = stackalloc uint[2];
        uint* data = stackalloc uint[6];                 // two __user_cap_data_struct: effective, permitted, inheritable
        header[0] = LinuxCapabilityVersion3;
        header[1] = 0;
        new Span<uint>(data, 6).Clear();
        // Effective and permitted hold CAP_NET_ADMIN alone (routes, addresses); inheritable stays empty,
        // so no program this daemon starts (beacon commands) inherits it.
        data[0] = data[1] = 1u << CAP_NET_ADMIN;
        if (CapSet(header, data) < 0) throw new IOException($"--user '{user}': cannot keep CAP_NET_ADMIN: {Libc.ErrorText(Libc.Errno)}");
    }
}

// ==== 15. Mesh: membership, peer exchange & claims ===============================================
// Members tell each other who they are, where they can be reached, which prefixes they serve and
// which members they know, in control records (RecordFlags.Control) inside their sessions: only
// members can read or forge them. Two messages (integers big-endian, every count bounded by Tune):
//   Self     1 ‖ nameLen u8 ‖ name ‖ observed ‖ n u8 ‖ n × endpoint ‖ m u8 ‖ m × claim [‖ flags u8]
//   Members  2 ‖ n u8 ‖ n × (public key 32 ‖ seen ago, s u32 ‖ k u8 ‖ k × endpoint)
//   Revoked  3 ‖ n u8 ‖ n × revocation (public key 32 ‖ issued, unix s u64 ‖ admin signature 64)
//   Punch    4 ‖ n u8 ‖ n × endpoint      (the sender's endpoints, to be answered at; see Node.Punch)
//   Ping 5 / Pong 6 ‖ id u64
//   Isolated 7 ‖ generation u32 ‖ part u8 ‖ parts u8 ‖ n u8 ‖ n × public key 32
// Self's flags: 1 = relays for members; 2 = marks members isolated. (Absent: 0, as older nodes send it.)
//   endpoint family u8 (4|6) ‖ address 4|16 ‖ port u16     claim  family u8 ‖ bits u8 ‖ address 4|16 ‖ metric u16
// "observed" is where the sender sees the receiver: behind a NAT, the receiver's public endpoint.
// Self goes to a peer when its session comes up, every ExchangeIntervalMs, and (debounced) when
// something changed; Members follows it, split so no message exceeds MaxExchangeLen. A message is
// parsed whole and checked before anything is applied; a bad one is counted and dropped.
// The node's membership half (Node, partial) is at the end of this section: members learned,
// marked up and down, the route election (RebuildRoutes) and the exchange's schedule.
// Policy, all decided here: who may be a member (configured keys, or under --mesh anyone whose
// handshake proves the network secret), which claims are accepted (host routes inside --network,
// anything inside --accept or the peer's --allow), names bound to the first key seen with them,
// host addresses to the first member that claims them. Route choice: see Node.RebuildRoutes.
// Revocation: a network may name an admin key (`admin`); a revocation it signed ends a member for
// good on every node that checks it: its sessions are dropped, its handshakes refused, its entries
// in Members ignored, and the revocation kept (the daemon's `revocations` file) and passed on to
// every member once per session and whenever the set grows. Signatures are checked off the node's
// lock (the daemon's chores thread); until then a received revocation waits, unapplied.
// Isolation: a node marks the peers its config calls `isolated` (a gateway's guests, joined with
// `veil invite --isolated`, which gives them a secret of their own, never the network's). It
// carries and relays nothing between them and other peers (Node.ReceivedData, Node.Forward), names
// them to nobody and tells them of nobody, and tells every other member the whole set in Isolated
// messages (one generation in `parts` messages, with every exchange); the Self flag 2 says a set
// exists, and a Self without it withdraws the sender's marks. A receiver takes marks only from
// peers its own config names, and refuses sessions with what they mark unless its config names
// that key too: it drops the sessions, refuses handshakes, ignores the key in Members, state file
// and beacons. Marks of a new generation count at once; marks a generation dropped go only once
// all its parts have arrived, and an older generation arriving within seconds is ignored, so a
// lost or late message can only keep a mark, never lift one early. Received marks persist in the
// state file.

internal readonly record struct Claim(IpPrefix Prefix, int Metric);

/// <summary>An admin's signed word that a key is no longer a member of the network. The signature
/// covers "veil revocation v1" ‖ key ‖ issued (u64, big-endian); an admin key names one network.</summary>
internal sealed class Revocation
{
    internal const int Len = Spec.KeyLen + 8 + AdminSignature.SignatureLen;
    private static ReadOnlySpan<byte> Domain => "veil revocation v1"u8;
    internal Key32 Key;
    internal long IssuedUnixS;
    internal readonly byte[] Signature = new byte[AdminSignature.SignatureLen];

    private byte[] Body()
    {
        byte[] b = new byte[Domain.Length + Spec.KeyLen + 8];
        Domain.CopyTo(b);
        ((ReadOnlySpan<byte>)Key).CopyTo(b.AsSpan(Domain.Length));
        BinaryPrimitives.WriteInt64BigEndian(b.AsSpan(Domain.Length + Spec.KeyLen), IssuedUnixS);
        return b;
    }

    internal static Revocation Create(byte[] adminPkcs8, in Key32 key, long issuedUnixS)
    {
        var r = new Revocation { Key = key, IssuedUnixS = issuedUnixS };
        AdminSignature.Sign(adminPkcs8, r.Body()).CopyTo(r.Signature, 0);
        return r;
    }

    internal bool Verify(ReadOnlySpan<byte> adminKey) => AdminSignature.Verify(adminKey, Body(), Signature);

    internal void Write(Span<byte> d)
    {
        ((ReadOnlySpan<byte>)Key).CopyTo(d);
        BinaryPrimitives.WriteInt64BigEndian(d[Spec.KeyLen..], IssuedUnixS);
        Signature.CopyTo(d[(Spec.KeyLen + 8)..]);
    }

    /// <summary>Exactly Len bytes, not yet verified.</summary>
    internal static Revocation? Read(ReadOnlySpan<byte> d)
    {
        if (d.Length != Len) return null;
        var r = new Revocation { IssuedUnixS = BinaryPrimitives.ReadInt64BigEndian(d[Spec.KeyLen..]) };
        d[..Spec.KeyLen].CopyTo(r.Key);
        d[(Spec.KeyLen + 8)..].CopyTo(r.Signature);
        return r;
    }

    /// <summary>One base64 line: the form of the revocations file and of `veil revoke --print`.</summary>
    internal string Encode()
    {
        byte[] b = new byte[Len];
        Write(b);
        return Convert.ToBase64String(b);
    }

    internal static Revocation? Decode(string line)
    {
        byte[] b = new byte[Len];
        return Convert.TryFromBase64String(line.Trim(), b, out int n) && n == Len ? Read(b) : null;
    }
}

/// <summary>A parsed exchange message, reused for every message received.</summary>
internal sealed class ExchangeMessage
{
    internal const byte TypeSelf = 1, TypeMembers = 2, TypeRevoked = 3, TypePunch = 4, TypePing = 5, TypePong = 6, TypeIsolated = 7, TypeFecLoss = 8;
    internal const byte SelfRelays = 1, SelfMarks = 2, SelfFresh = 4, SelfReachesAll = 8, SelfHearsRefusals = 16;
    internal const int IsolatedHeaderLen = 8, MaxMarksPerMessage = (Tune.MaxExchangeLen - IsolatedHeaderLen) / Spec.KeyLen;
    internal const int MaxMarkParts = (Tune.MaxMarksPerMember + MaxMarksPerMessage - 1) / MaxMarksPerMessage;
    internal const int MaxRevocations = (Tune.MaxExchangeLen - 2) / Revocation.Len;   // per message
    internal const int MaxNameLen = 32, MaxMembers = 32;
    internal const int EntryFixedLen = Spec.KeyLen + 4 + 1;

    internal byte Type, SelfFlags;
    internal ulong PingId;
    internal string Name = "";
    internal Endpoint Observed;
    internal readonly List<Endpoint> Endpoints = new();
    internal readonly List<Claim> Claims = new();
    internal readonly List<(Key32 Key, uint SeenAgoS, int First, int Count)> Members = new();
    internal readonly List<Endpoint> MemberEndpoints = new();
    internal readonly List<Revocation> Revocations = new();
    internal uint MarkGeneration;
    internal int MarkPart, MarkParts;
    internal int LossBp;
    internal readonly List<Key32> Marks = new();

    /// <summary>True when m is one well-formed message; on false the contents are meaningless.</summary>
    internal bool Parse(ReadOnlySpan<byte> m)
    {
        Endpoints.Clear(); Claims.Clear(); Members.Clear(); MemberEndpoints.Clear(); Revocations.Clear(); Marks.Clear();
        Name = "";
        SelfFlags = 0;
        if (m.Length is < 2 or > Tune.MaxExchangeLen) return false;
        Type = m[0];
        int pos = 1;
        if (Type == TypeSelf)
        {
            int nameLen = m[pos++];
            if (nameLen is 0 or > MaxNameLen || pos + nameLen > m.Length) return false;
            foreach (byte c in m.Slice(pos, nameLen))
                if (!UpConfig.IsNameChar((char)c)) return false;
            Name = Encoding.ASCII.GetString(m.Slice(pos, nameLen));
            pos += nameLen;
            if (!ReadEndpoint(m, ref pos, out Observed, allowUnset: true)) return false;
            if (pos >= m.Length || m[pos] > Tune.MaxEndpointsPerMember) return false;
            for (int n = m[pos++]; n > 0; n--)
            {
                if (!ReadEndpoint(m, ref pos, out Endpoint e, allowUnset: false)) return false;
                Endpoints.Add(e);
            }
            if (pos >= m.Length || m[pos] > Tune.MaxClaimsPerMember) return false;
            for (int n = m[pos++]; n > 0; n--)
            {
                if (pos + 2 > m.Length) return false;
                int family = m[pos], bits = m[pos + 1], len = family == 4 ? 4 : family == 6 ? 16 : 0;
                if (len == 0 || bits > len * 8 || pos + 2 + len + 2 > m.Length) return false;
                if (HasHostBits(m.Slice(pos + 2, len), bits)) return false;
                Claims.Add(new Claim(new IpPrefix(m.Slice(pos + 2, len), bits), BinaryPrimitives.ReadUInt16BigEndian(m[(pos + 2 + len)..])));
                pos += 2 + len + 2;
            }
            if (pos < m.Length) SelfFlags = m[pos++];
        }
        else if (Type == TypePunch)
        {
            if (m[pos] is 0 or > Tune.MaxEndpointsPerMember) return false;
            for (int n = m[pos++]; n > 0; n--)
            {
                if (!ReadEndpoint(m, ref pos, out Endpoint e, allowUnset: false)) return false;
                Endpoints.Add(e);
            }
        }
        else if (Type == TypeMembers)
        {
            if (m[pos] > MaxMembers) return false;
            for (int n = m[pos++]; n > 0; n--)
            {
                if (pos + EntryFixedLen > m.Length) return false;
                Key32 key = default;
                m.Slice(pos, Spec.KeyLen).CopyTo(key);
                uint ago = BinaryPrimitives.ReadUInt32BigEndian(m[(pos + Spec.KeyLen)..]);
                int count = m[pos + Spec.KeyLen + 4];
                pos += EntryFixedLen;
                if (count > Tune.MaxEndpointsPerEntry) return false;
                int first = MemberEndpoints.Count;
                for (int k = 0; k < count; k++)
                {
                    if (!ReadEndpoint(m, ref pos, out Endpoint e, allowUnset: false)) return false;
                    MemberEndpoints.Add(e);
                }
                Members.Add((key, ago, first, count));
            }
        }
        else if (Type == TypeFecLoss)
        {
            if (m.Length != 3) return false;
            LossBp = BinaryPrimitives.ReadUInt16BigEndian(m[1..]);
            if (LossBp > 10_000) return false;
            pos = 3;
        }
        else if (Type is TypePing or TypePong)
        {
            if (m.Length != 9) return false;
            PingId = BinaryPrimitives.ReadUInt64BigEndian(m[1..]);
            pos = 9;
        }
        else if (Type == TypeRevoked)
        {
            int n = m[pos++];
            if (n is 0 or > MaxRevocations || pos + n * Revocation.Len != m.Length) return false;
            for (; n > 0; n--, pos += Revocation.Len) Revocations.Add(Revocation.Read(m.Slice(pos, Revocation.Len))!);
        }
        else if (Type == TypeIsolated)
        {
            if (m.Length < IsolatedHeaderLen) return false;
            MarkGeneration = BinaryPrimitives.ReadUInt32BigEndian(m[1..]);
            MarkPart = m[5];
            MarkParts = m[6];
            int n = m[7];
            pos = IsolatedHeaderLen;
            if (MarkParts is 0 or > MaxMarkParts || MarkPart >= MarkParts || n > MaxMarksPerMessage || pos + n * Spec.KeyLen != m.Length) return false;
            for (; n > 0; n--, pos += Spec.KeyLen)
            {
                Key32 k = default;
                m.Slice(pos, Spec.KeyLen).CopyTo(k);
                Marks.Add(k);
            }
        }
        else return false;
        return pos == m.Length;
    }

    // A claim whose address has bits set past its prefix length is malformed, not silently masked.
    private static bool HasHostBits(ReadOnlySpan<byte> address, int bits)
    {
        for (int i = bits; i < address.Length * 8; i++)
            if ((address[i >> 3] & (0x80 >> (i & 7))) != 0) return true;
        return false;
    }

    internal static bool ReadEndpoint(ReadOnlySpan<byte> m, ref int pos, out Endpoint e, bool allowUnset)
    {
        e = default;
        if (pos >= m.Length) return false;
        int len = m[pos] == 4 ? 4 : m[pos] == 6 ? 16 : 0;
        if (len == 0 || pos + 1 + len + 2 > m.Length) return false;
        e = len == 4 ? Endpoint.FromV4(BinaryPrimitives.ReadUInt32BigEndian(m[(pos + 1)..]), 0)
                     : new Endpoint { Address = BinaryPrimitives.ReadUInt128BigEndian(m[(pos + 1)..]) };
        e.Port = BinaryPrimitives.ReadUInt16BigEndian(m[(pos + 1 + len)..]);
        pos += 1 + len + 2;
        return (allowUnset || e.IsSet) && !TcpLinks.IsTcp(e);    // 100::/64 names our own TCP links: never on the wire
    }

    internal static int EndpointLen(in Endpoint e) => e.IsV4 ? 7 : 19;

    internal static int WriteEndpoint(Span<byte> d, in Endpoint e)
    {
        Span<byte> a = stackalloc byte[16];
        e.WriteAddress16(a);
        int len = e.IsV4 ? 4 : 16;
        d[0] = (byte)(e.IsV4 ? 4 : 6);
        a[(16 - len)..].CopyTo(d[1..]);
        BinaryPrimitives.WriteUInt16BigEndian(d[(1 + len)..], e.Port);
        return 1 + len + 2;
    }

    /// <summary>One entry of a Members message; the caller writes the type and count bytes.</summary>
    internal static int WriteEntry(Span<byte> d, in Key32 key, uint seenAgoS, List<Endpoint> endpoints)
    {
        ((ReadOnlySpan<byte>)key).CopyTo(d);
        BinaryPrimitives.WriteUInt32BigEndian(d[Spec.KeyLen..], seenAgoS);
        d[Spec.KeyLen + 4] = (byte)endpoints.Count;
        int pos = EntryFixedLen;
        foreach (Endpoint e in endpoints) pos += WriteEndpoint(d[pos..], e);
        return pos;
    }

    internal static int WriteSelf(Span<byte> d, string name, in Endpoint observed, List<Endpoint> endpoints, List<Claim> claims, byte flags)
    {
        int pos = 0;
        d[pos++] = TypeSelf;
        d[pos++] = (byte)name.Length;
        pos += Encoding.ASCII.GetBytes(name, d[pos..]);
        pos += WriteEndpoint(d[pos..], observed);
        int n = Math.Min(endpoints.Count, Tune.MaxEndpointsPerMember);
        d[pos++] = (byte)n;
        for (int i = 0; i < n; i++) pos += WriteEndpoint(d[pos..], endpoints[i]);
        n = Math.Min(claims.Count, Tune.MaxClaimsPerMember);
        d[pos++] = (byte)n;
        for (int i = 0; i < n; i++)
        {
            IpPrefix p = claims[i].Prefix;
            int len = p.IsV6 ? 16 : 4;
            d[pos] = (byte)(p.IsV6 ? 6 : 4);
            d[pos + 1] = (byte)p.Bits;
            p.WriteAddress(d[(pos + 2)..]);
            BinaryPrimitives.WriteUInt16BigEndian(d[(pos + 2 + len)..], (ushort)claims[i].Metric);
            pos += 2 + len + 2;
        }
        d[pos++] = flags;
        return pos;
    }

    /// <summary>FecLoss (8): type ‖ loss u16, the share of the receiver's records that did not arrive, in
    /// parts per 10,000 (§12.1).</summary>
    internal static int WriteLoss(Span<byte> d, int lossBp)
    {
        d[0] = TypeFecLoss;
        BinaryPrimitives.WriteUInt16BigEndian(d[1..], (ushort)Math.Clamp(lossBp, 0, 10_000));
        return 3;
    }

    /// <summary>Ping (5) or Pong (6): type ‖ id u64, the Pong echoing the Ping's id.</summary>
    internal static int WritePing(Span<byte> d, byte type, ulong id)
    {
        d[0] = type;
        BinaryPrimitives.WriteUInt64BigEndian(d[1..], id);
        return 9;
    }

    /// <summary>Part `part` of `parts` of the sender's marks: keys[first..first+count).</summary>
    internal static int WriteIsolated(Span<byte> d, uint generation, int part, int parts, List<Key32> keys, int first, int count)
    {
        d[0] = TypeIsolated;
        BinaryPrimitives.WriteUInt32BigEndian(d[1..], generation);
        d[5] = (byte)part;
        d[6] = (byte)parts;
        d[7] = (byte)count;
        for (int i = 0; i < count; i++)
        {
            Key32 k = keys[first + i];
            ((ReadOnlySpan<byte>)k).CopyTo(d[(IsolatedHeaderLen + i * Spec.KeyLen)..]);
        }
        return IsolatedHeaderLen + count * Spec.KeyLen;
    }

    internal static int WritePunch(Span<byte> d, List<Endpoint> endpoints)
    {
        d[0] = TypePunch;
        int n = Math.Min(endpoints.Count, Tune.MaxEndpointsPerMember), pos = 2;
        d[1] = (byte)n;
        for (int i = 0; i < n; i++) pos += WriteEndpoint(d[pos..], endpoints[i]);
        return pos;
    }
}

/// <summary>--address auto (mesh only): each --network gets a host address derived from the node's
/// public key: candidate i is SHA-256("veil address" ‖ key ‖ network ‖ i) reduced to the network's
/// host part (never its first or last address). Every node computes the same candidates for a
/// key, so the address is stable without being stored; a collision moves only the node with the
/// higher key, to its next free candidate (Daemon.MoveAddress), and the address it moved to is
/// kept in the state file (an "address" line) for the next start.</summary>
internal static class AutoAddress
{
    internal const int MaxCandidates = 64;

    internal static IfAddress Candidate(in Key32 key, IpPrefix network, int index)
    {
        Span<byte> input = stackalloc byte[12 + 32 + 17 + 4];
        input.Clear();                                  // SkipLocalsInit: an IPv4 network fills 4 of its 16 bytes
        "veil address"u8.CopyTo(input);
        ((ReadOnlySpan<byte>)key).CopyTo(input[12..]);
        network.WriteAddress(input.Slice(44, 16));
        input[60] = (byte)network.Bits;
        BinaryPrimitives.WriteInt32BigEndian(input[61..], index);
        Span<byte> hash = stackalloc byte[32];
        SHA256.HashData(input, hash);
        int hostBits = network.MaxBits - network.Bits;
        UInt128 hosts = hostBits >= 128 ? UInt128.MaxValue : (UInt128.One << hostBits);
        // 1 .. hosts-2: the network's own address and (IPv4) its broadcast address are never ours.
        UInt128 h = 1 + BinaryPrimitives.ReadUInt128BigEndian(hash[..16]) % (hosts > 3 ? hosts - 2 : 1);
        Span<byte> addr = stackalloc byte[16];
        addr.Clear();
        network.WriteAddress(addr);
        UInt128 value = BinaryPrimitives.ReadUInt128BigEndian(addr) | (network.IsV6 ? h : h << 96);
        BinaryPrimitives.WriteUInt128BigEndian(addr, value);
        return new IfAddress(new IPAddress(addr[..(network.IsV6 ? 16 : 4)]), network.Bits);
    }

    /// <summary>Fills cfg.Addresses: what the running daemon uses (a reload never moves it), else the
    /// state file's address inside each network, else candidate 0.</summary>
    internal static void Choose(UpConfig cfg, UpConfig? running)
    {
        if (!cfg.Mesh) throw new ConfigException("--address auto needs --mesh: members settle address collisions among themselves");
        if (cfg.Networks.Count == 0) throw new ConfigException("--address auto needs --network CIDR: the prefix to take an address from");
        if (cfg.Addresses.Count > 0) throw new ConfigException("--address auto replaces the addresses: give either auto or addresses");
        if (running is { AddressAuto: true }) { cfg.Addresses.AddRange(running.Addresses); return; }
        List<IfAddress> stored = Stored(cfg.StatePath);
        foreach (IpPrefix net in cfg.Networks)
        {
            if (net.MaxBits - net.Bits < 2) throw new ConfigException($"--network {net} is too small for --address auto");
            int kept = stored.FindIndex(a => a.IsV6 == net.IsV6 && a.Bits == net.Bits && net.Contains(a.Address.GetAddressBytes()));
            cfg.Addresses.Add(kept >= 0 ? stored[kept] : Candidate(cfg.PublicKey, net, 0));
        }
    }

    // The state file's "address" lines (Node.StateText); nothing when it cannot be read.
    private static List<IfAddress> Stored(string? statePath)
    {
        var found = new List<IfAddress>();
        try
        {
            if (statePath == null || !File.Exists(statePath)) return found;
            foreach (string line in File.ReadLines(statePath))
                if (line.StartsWith("address ", StringComparison.Ordinal) && IfAddress.TryParse(line[8..].Trim(), out IfAddress a)) found.Add(a);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
        return found;
    }

    internal static bool IsCandidate(in Key32 key, IpPrefix network, IPAddress address)
    {
        for (int i = 0; i < MaxCandidates; i++)
            if (Candidate(key, network, i).Address.Equals(address)) return true;
        return false;
    }

    /// <summary>The next candidate for network that is not in taken: null when all are.</summary>
    internal static IfAddress? Next(in Key32 key, IpPrefix network, Func<IPAddress, bool> taken)
    {
        for (int i = 0; i < MaxCandidates; i++)
        {
            IfAddress c = Candidate(key, network, i);
            if (!taken(c.Address)) return c;
        }
        return null;
    }
}

/// <summary>The mesh policy and the exchange: what this node announces, what it accepts, and the
/// pins that keep names and addresses bound to keys. It acts on the Node it belongs to.</summary>
internal sealed class Mesh
{
    private readonly Node _node;
    internal bool Open;                                   // --mesh
    internal string Name = "";
    internal List<IpPrefix> Networks = new(), Accept = new();
    internal string? ExitNode;                             // the one member whose default routes we take
    internal List<IfAddress> AutoAddresses = new();        // --address auto: ours, kept in the state file
    internal (Peer By, Claim Claim)? MoveAddress;          // an auto address a lower key claims: the daemon moves off it
    internal long AutoAddressSinceMs = -1;                 // when we took our auto addresses (start, last move)
    internal readonly List<Claim> OwnClaims = new();
    private readonly List<Claim> _claimsWithoutExit = new();   // what members our --exit-for leaves out are told
    private List<string> _exitFor = new();
    internal readonly List<IpPrefix> OwnHosts = new();    // this node's overlay addresses, as host prefixes
    internal readonly List<Endpoint> LocalEndpoints = new();   // interface addresses + port, set by the daemon
    internal Endpoint Mapped;                                   // what the gateway forwards to us (PortMapper)
    internal readonly List<Endpoint> Observed = new();         // how peers see us, newest last
    private const int MaxObserved = 2;
    private readonly Dictionary<string, KeyId> _nameOwner = new();
    private readonly Dictionary<KeyId, string> _keyName = new();
    private readonly Dictionary<IpPrefix, KeyId> _addressOwner = new();
    private readonly ExchangeMessage _in = new();
    private readonly byte[] _out = new byte[Tune.MaxExchangeLen];
    private readonly List<Endpoint> _scratch = new();
    internal long SentBytes, SentMessages, ReceivedMessages, Rejected, ClaimsRefused, MembersLearned, MembersForgotten;

    // Revocations (see the section's prose). Received ones wait in Unverified for the daemon.
    internal byte[]? AdminKey;
    private readonly Dictionary<KeyId, Revocation> _revoked = new();
    internal readonly Queue<Revocation> Unverified = new();
    private readonly HashSet<KeyId> _unverifiedKeys = new();
    internal long RevocationsVersion;                    // moves when the set grows
    internal long RevocationsRejected, RevokedRefused;
    internal int RevocationCount => _revoked.Count;

    // Isolation marks (see the section's prose): ours, from the config, and each member's.
    // Committed: the last whole set; Next: the generation arriving. Both count (a new mark at once),
    // each at most MaxMarksPerMember; Next replaces Committed once all its parts are in.
    private sealed class MarkSet
    {
        internal uint Generation;
        internal long GenerationSinceMs;
        internal int Parts;                               // 0: loaded from the state file
        internal ulong PartsSeen;
        internal readonly HashSet<KeyId> Committed = new(), Next = new();
    }
    internal readonly List<Key32> OwnMarks = new();
    internal uint MarksGeneration = BinaryPrimitives.ReadUInt32LittleEndian(RandomNumberGenerator.GetBytes(4));   // a restart starts a new one
    private readonly Dictionary<KeyId, MarkSet> _marksBy = new();
    private readonly HashSet<KeyId> _barred = new();     // every member's marks but ours
    internal long MarksVersion;                          // moves when _barred changes; the state file follows
    internal long IsolatedRefused, MarksDropped;
    internal int BarredCount => _barred.Count;

    internal Mesh(Node node) { _node = node; }

    /// <summary>A member marks this key isolated, and our own config does not name it: no session.</summary>
    internal bool Refuses(in Key32 key) => _barred.Count > 0 && _barred.Contains(KeyId.Of(key)) && _node.FindPeer(key) is not { Learned: false };

    internal void RefusedIsolated(in Key32 key)
    {
        IsolatedRefused++;
        if (_node.Log.Wants(LogLevel.Info, "handshake_refused"))
            _node.Log.Emit(LogLevel.Info, "handshake_refused", $"reason=isolated key={key.Short()}");
    }

    // One part of a member's marks. Only a peer of our own config marks for us (a member learned
    // from the mesh could otherwise cut any key off everywhere), and never one we isolate ourselves.
    private void ApplyMarks(Peer from, long nowMs)
    {
        if (from.Isolated || from.Learned) { MarksDropped += _in.Marks.Count; return; }
        var id = KeyId.Of(from.PublicKey);
        if (!_marksBy.TryGetValue(id, out MarkSet? set))
        {
            if (_marksBy.Count >= Tune.MaxMarkingMembers) { MarksDropped += _in.Marks.Count; return; }
            _marksBy[id] = set = new MarkSet();
        }
        if (set.Generation != _in.MarkGeneration || set.Parts != _in.MarkParts)
        {
            // An older generation within seconds of a newer one is a late datagram, not a restart.
            if ((int)(_in.MarkGeneration - set.Generation) < 0 && set.Parts > 0 && nowMs - set.GenerationSinceMs < Tune.MarkReorderWindowMs) return;
            set.Generation = _in.MarkGeneration;
            set.GenerationSinceMs = nowMs;
            set.Parts = _in.MarkParts;
            set.PartsSeen = 0;
            set.Next.Clear();
        }
        ulong bit = 1UL << _in.MarkPart;
        if ((set.PartsSeen & bit) != 0) return;                    // a repeat (the set comes again every exchange)
        set.PartsSeen |= bit;
        foreach (Key32 k in _in.Marks)
        {
            if (k.EqualsCt(_node.Handshaker.PublicKey) || k.EqualsCt(from.PublicKey)) continue;
            if (set.Next.Count >= Tune.MaxMarksPerMember) { MarksDropped++; continue; }
            set.Next.Add(KeyId.Of(k));
        }
        if (set.PartsSeen == (1UL << set.Parts) - 1)                // the whole set: what it dropped goes
        {
            set.Committed.Clear();
            set.Committed.UnionWith(set.Next);
        }
        MarksChanged(from.Name, nowMs);
    }

    /// <summary>A member's Self without the marks flag: it marks nobody (any more).</summary>
    internal void ClearMarks(Peer from, long nowMs)
    {
        if (_marksBy.Remove(KeyId.Of(from.PublicKey))) MarksChanged(from.Name, nowMs);
    }

    // _barred follows the sets; learned members it now names lose their sessions.
    private void MarksChanged(string by, long nowMs)
    {
        var next = new HashSet<KeyId>();
        foreach (MarkSet set in _marksBy.Values) { next.UnionWith(set.Committed); next.UnionWith(set.Next); }
        if (next.SetEquals(_barred)) return;
        _barred.Clear();
        _barred.UnionWith(next);
        MarksVersion++;
        var gone = _node.Peers.FindAll(q => q.Active && q.Learned && _barred.Contains(KeyId.Of(q.PublicKey)));
        foreach (Peer q in gone)
        {
            _node.Log.Warn("peer_isolated", $"peer={q.Name} by={by} sessions_dropped={(q.HoldsKeys ? 1 : 0)} hint=\"a member marks this key isolated: it reaches only that member\"");
            _node.RemovePeer(q, "isolated");
        }
        if (gone.Count > 0) _node.RebuildRoutes();
    }

    /// <summary>The state file's "isolated MARKER KEY..." lines: what members mark, kept across a restart.</summary>
    internal void WriteMarks(StringBuilder sb)
    {
        foreach (var (by, set) in _marksBy)
        {
            var keys = new HashSet<KeyId>(set.Committed);
            keys.UnionWith(set.Next);
            if (keys.Count == 0) continue;
            sb.Append("isolated ").Append(by.Key().ToBase64());
            int n = 0;
            foreach (KeyId k in keys) if (n++ < Tune.MaxMarksPerMember) sb.Append(' ').Append(k.Key().ToBase64());
            sb.Append('\n');
        }
    }

    /// <summary>A state file's marks of one member: kept only while that member is in our config.</summary>
    internal void LoadMarks(in Key32 by, List<Key32> keys, long nowMs)
    {
        var id = KeyId.Of(by);
        if (_node.FindPeer(by) is not { Learned: false } || _marksBy.Count >= Tune.MaxMarkingMembers && !_marksBy.ContainsKey(id)) return;
        if (!_marksBy.TryGetValue(id, out MarkSet? set)) _marksBy[id] = set = new MarkSet();
        foreach (Key32 k in keys)
            if (!k.EqualsCt(_node.Handshaker.PublicKey) && set.Committed.Count < Tune.MaxMarksPerMember) set.Committed.Add(KeyId.Of(k));
        MarksChanged("state", nowMs);
    }

    // Ours, all parts of the set, to a member we do not isolate.
    private bool SendMarks(Peer p, long nowMs)
    {
        int parts = Math.Max(1, (OwnMarks.Count + ExchangeMessage.MaxMarksPerMessage - 1) / ExchangeMessage.MaxMarksPerMessage);
        for (int part = 0; part < parts; part++)
        {
            int first = part * ExchangeMessage.MaxMarksPerMessage, count = Math.Min(ExchangeMessage.MaxMarksPerMessage, OwnMarks.Count - first);
            if (!Send(p, ExchangeMessage.WriteIsolated(_out, MarksGeneration, part, parts, OwnMarks, first, count), nowMs)) return false;
        }
        return true;
    }

    internal bool IsRevoked(in Key32 key) => _revoked.Count > 0 && _revoked.ContainsKey(KeyId.Of(key));

    internal void RefusedRevoked(in Key32 key)
    {
        RevokedRefused++;
        if (_node.Log.Wants(LogLevel.Warn, "handshake_refused"))
            _node.Log.Emit(LogLevel.Warn, "handshake_refused", $"reason=revoked key={key.Short()}");
    }

    /// <summary>Applies a verified revocation: the key is no member from now on. False when it was
    /// known already or the table is full.</summary>
    internal bool Revoke(Revocation r, long nowMs)
    {
        var id = KeyId.Of(r.Key);
        if (_revoked.ContainsKey(id)) return false;
        if (_revoked.Count >= Tune.MaxRevocations)
        {
            _node.Log.Warn("revocation_dropped", $"key={r.Key.Short()} hint=\"{Tune.MaxRevocations} revocations are kept at most\"");
            return false;
        }
        _revoked[id] = r;
        RevocationsVersion++;
        if (r.Key.EqualsCt(_node.Handshaker.PublicKey))
            _node.Log.Error("node_revoked", "hint=\"the network's admin revoked this node: members will refuse it\"");
        else if (_node.FindPeer(r.Key) is Peer p)
        {
            _node.Log.Warn("peer_revoked", $"peer={p.Name} sessions_dropped={(p.HoldsKeys ? 1 : 0)}");
            _node.RemovePeer(p, "revoked");
            _node.RebuildRoutes();
        }
        else _node.Log.Info("peer_revoked", $"key={r.Key.Short()} known=false");
        _node.ScheduleExchange(nowMs);                   // pass it on to every member
        return true;
    }

    /// <summary>Revocations a member sent: queued for checking (the daemon verifies signatures off
    /// the lock), bounded and without repeats; ignored when this node names no admin key.</summary>
    private void QueueRevocations()
    {
        if (AdminKey == null) return;
        foreach (Revocation r in _in.Revocations)
        {
            var id = KeyId.Of(r.Key);
            if (_revoked.ContainsKey(id) || _unverifiedKeys.Count >= Tune.MaxRevocations || !_unverifiedKeys.Add(id)) continue;
            Unverified.Enqueue(r);
        }
        if (Unverified.Count > 0) _node.Signal.Poke();
    }

    /// <summary>Takes what waits for checking (the daemon, under the lock).</summary>
    internal List<Revocation> TakeUnverified()
    {
        var list = new List<Revocation>(Unverified);
        Unverified.Clear();
        _unverifiedKeys.Clear();
        return list;
    }

    /// <summary>Takes the mesh keys of a (re)loaded config; true when what we announce changed.</summary>
    internal bool Configure(UpConfig cfg)
    {
        var claims = new List<Claim>();
        OwnHosts.Clear();
        foreach (IfAddress a in cfg.Addresses)
        {
            IpPrefix host = a.Host;
            OwnHosts.Add(host);
            claims.Add(new Claim(host, cfg.Metric));
        }
        foreach (IpPrefix c in cfg.Claims) claims.Add(new Claim(c, cfg.Metric));
        if (cfg.Exit) foreach (string d in new[] { "0.0.0.0/0", "::/0" }) claims.Add(new Claim(IpPrefix.Parse(d), cfg.Metric));
        ExitNode = cfg.ExitNode;
        var marks = cfg.Peers.FindAll(pc => pc.Isolated).ConvertAll(pc => pc.PublicKey);
        bool marksChanged = marks.Count != OwnMarks.Count || !marks.TrueForAll(k => OwnMarks.Exists(o => o.EqualsCt(k)));
        if (marksChanged) { OwnMarks.Clear(); OwnMarks.AddRange(marks); MarksGeneration++; }
        AutoAddresses = cfg.AddressAuto ? new List<IfAddress>(cfg.Addresses) : new();
        string name = cfg.Name.Length > 0 ? cfg.Name : cfg.PublicKey.DefaultName();
        bool changed = !SameClaims(claims, OwnClaims) || Name != name || marksChanged || string.Join(' ', cfg.ExitFor) != string.Join(' ', _exitFor);
        OwnClaims.Clear();
        OwnClaims.AddRange(claims);
        _claimsWithoutExit.Clear();
        _claimsWithoutExit.AddRange(claims.FindAll(c => c.Prefix.Bits > 0));
        _exitFor = new List<string>(cfg.ExitFor);
        Open = cfg.Mesh;
        Name = name;
        AdminKey = cfg.AdminKey;
        Networks = new List<IpPrefix>(cfg.Networks);
        Accept = new List<IpPrefix>(cfg.Accept);
        return changed;
    }

    private static bool SameClaims(List<Claim> a, List<Claim> b)
    {
        if (a.Count != b.Count) return false;
        foreach (Claim c in a)
            if (!b.Contains(c)) return false;
        return true;
    }

    /// <summary>Our side of the exchange with p: Self, then the members p may not know.</summary>
    internal void SendTo(Peer p, long nowMs)
    {
        p.ExchangeAtMs = nowMs + Tune.ExchangeIntervalMs;
        OwnEndpoints();
        // Through a relay, or over our TCP link, we do not see where it is.
        Endpoint observed = _node.PathRelay(p, nowMs) == null && !TcpLinks.IsTcp(p.Endpoint) ? p.Endpoint : default;
        byte flags = (byte)((_node.Relays.Offered ? ExchangeMessage.SelfRelays : 0) | (OwnMarks.Count > 0 ? ExchangeMessage.SelfMarks : 0) |
                            (p.MembersHeard ? 0 : ExchangeMessage.SelfFresh) | (AllPeersUp() ? ExchangeMessage.SelfReachesAll : 0) |
                            ExchangeMessage.SelfHearsRefusals);
        int len = ExchangeMessage.WriteSelf(_out, Name, observed, _scratch, _node.ExitRefused(p) ? _claimsWithoutExit : OwnClaims, flags);
        if (!Send(p, len, nowMs)) return;
        p.SelfSentOn = p.Current;
        if (OwnMarks.Count > 0 && !p.Isolated) SendMarks(p, nowMs);    // before Members, which a mark may concern
        if (!SendMemberList(p, nowMs)) return;
        if (p.RevocationsSentVersion != RevocationsVersion && SendRevocations(p, nowMs)) p.RevocationsSentVersion = RevocationsVersion;
    }

    // The list goes when it changed, when p asks (it started since: ApplySelf), and every
    // MembersRefreshMs (what keeps members p cannot reach from being forgotten) unless p said it
    // has every peer it knows up: then it hears from each itself. Unchanged, the list was most of
    // a mesh's steady traffic. False when a message could not be sent.
    private bool SendMemberList(Peer p, long nowMs)
    {
        (long digest, long keys, long told, int listed) = MembersDigest(p);
        bool refresh = !p.ReachesAll && nowMs - p.MembersSentMs >= Tune.MembersRefreshMs;
        if (digest == p.MembersDigest && !refresh) { p.MembersSettleAtMs = 0; return true; }
        // Only endpoints changed, and p has every member it knows up: it needs none of them. (Its
        // Self says so again within ExchangeIntervalMs of losing one; the changed list goes then.)
        if (!refresh && p.ReachesAll && p.MembersDigest != 0 && keys == p.MembersKeysDigest) { p.MembersSettleAtMs = 0; return true; }
        // A list that only lost members or changed an endpoint (a member relayed or silent for a
        // moment, as around a rekey) waits MembersSettleMs: back as it was by then, nothing goes.
        // One that gained a member goes at once (that is how members find each other).
        if (!refresh && p.MembersDigest != 0 && listed <= p.MembersListed)
        {
            if (p.MembersSettleAtMs == 0)
            {
                p.MembersSettleAtMs = nowMs + Tune.MembersSettleMs;
                if (p.ExchangeAtMs == 0 || p.ExchangeAtMs > p.MembersSettleAtMs) p.ExchangeAtMs = p.MembersSettleAtMs;
            }
            if (nowMs < p.MembersSettleAtMs) return true;
        }
        p.MembersSettleAtMs = 0;
        // What p heard last is still as it was, and only members were added: they alone go (while a
        // mesh forms, each list gains a member at a time, and went again whole each time).
        bool added = !refresh && p.MembersDigest != 0 && told == p.MembersDigest;
        if (!added) Array.Clear(p.MembersTold);
        Span<byte> d = _out;
        int pos = 2, count = 0;
        foreach (Peer q in _node.Peers)
        {
            if (!Listed(p, q) || added && Told(p, q)) continue;
            if (q.Id >= p.MembersTold.Length * 64) Array.Resize(ref p.MembersTold, q.Id / 64 + 1);
            p.MembersTold[q.Id / 64] |= 1UL << q.Id;
            _scratch.Clear();
            if (q.Endpoint.IsSet && !TcpLinks.IsTcp(q.Endpoint)) _scratch.Add(q.Endpoint);
            foreach (Endpoint e in q.Announced) AddBounded(_scratch, e, Tune.MaxEndpointsPerEntry);
            int entryLen = ExchangeMessage.EntryFixedLen;
            foreach (Endpoint e in _scratch) entryLen += ExchangeMessage.EndpointLen(e);
            if (pos + entryLen > Tune.MaxExchangeLen || count == ExchangeMessage.MaxMembers)
            {
                if (!SendMembers(p, pos, count, nowMs)) return false;
                pos = 2; count = 0;
            }
            long seenS = q.LastRxMs < 0 ? 0 : Math.Max(0, nowMs - q.LastRxMs) / 1000;
            pos += ExchangeMessage.WriteEntry(d[pos..], q.PublicKey, (uint)Math.Min(seenS, uint.MaxValue), _scratch);
            count++;
            MembersEntriesSent++;
        }
        if (count > 0 && !SendMembers(p, pos, count, nowMs)) return false;
        p.MembersDigest = digest;
        p.MembersKeysDigest = keys;
        p.MembersListed = listed;
        p.MembersSentMs = nowMs;
        if (count > 0) p.MembersSentOn = p.Current;      // an empty list sends nothing: p has heard none
        return true;
    }

    // What our Self says (SelfReachesAll). It is at most ExchangeIntervalMs old when a peer goes
    // down, and the refresh it stops comes within another interval: both well inside ForgetMemberAfterMs.
    private bool AllPeersUp()
    {
        foreach (Peer q in _node.Peers)
            if (q.Active && !q.Up) return false;
        return true;
    }

    // Whether p's member list names q: members we have up directly. A relayed member: its relay
    // tells of it. An isolated one is nobody's business but ours, and an isolated peer hears of nobody.
    private static bool Listed(Peer p, Peer q) => q.Active && q.Up && q != p && q.Relay == null && !q.Isolated && !p.Isolated;

    private static bool Told(Peer p, Peer q) => q.Id < p.MembersTold.Length * 64 && (p.MembersTold[q.Id / 64] & (1UL << q.Id)) != 0;

    // What the member list for p holds (keys and endpoints, not the ages) as one number (never 0),
    // the same of its keys alone, the same of the members our lists since the last whole one
    // named (equal to the digest then: nothing of it changed), and how many members it names.
    private (long Digest, long Keys, long Told, int Listed) MembersDigest(Peer p)
    {
        var h = new HashCode();
        var k = new HashCode();
        var t = new HashCode();
        int n = 0;
        foreach (Peer q in _node.Peers)
        {
            if (!Listed(p, q)) continue;
            n++;
            var e = new HashCode();
            e.Add(KeyId.Of(q.PublicKey));
            if (q.Endpoint.IsSet && !TcpLinks.IsTcp(q.Endpoint)) e.Add(q.Endpoint);
            foreach (Endpoint a in q.Announced) e.Add(a);
            int entry = e.ToHashCode();
            h.Add(entry);
            k.Add(KeyId.Of(q.PublicKey));
            if (Told(p, q)) t.Add(entry);
        }
        long v = h.ToHashCode(), told = t.ToHashCode();
        return (v == 0 ? 1 : v, k.ToHashCode(), told == 0 ? 1 : told, n);
    }

    internal long BeaconsLoaded, BeaconsRejected;

    /// <summary>Where members may reach us now (a copy, for a beacon).</summary>
    internal List<Endpoint> EndpointsNow()
    {
        OwnEndpoints();
        return new List<Endpoint>(_scratch);
    }

    // Where members may reach us (into _scratch): the gateway's mapping, how members see us, then our
    // interfaces' addresses.
    private void OwnEndpoints()
    {
        _scratch.Clear();
        AddBounded(_scratch, Mapped, Tune.MaxEndpointsPerMember);
        foreach (Endpoint e in Observed) AddBounded(_scratch, e, Tune.MaxEndpointsPerMember);
        foreach (Endpoint e in LocalEndpoints) AddBounded(_scratch, e, Tune.MaxEndpointsPerMember);
    }

    /// <summary>A Veil-layer echo request to p (`veil ping`); the Pong comes to Node.Ponged.</summary>
    internal bool SendPing(Peer p, ulong id, long nowMs) => Send(p, ExchangeMessage.WritePing(_out, ExchangeMessage.TypePing, id), nowMs);

    /// <summary>Tells p what share of its records we lose (§12.1).</summary>
    internal bool SendLoss(Peer p, int lossBp, long nowMs) => Send(p, ExchangeMessage.WriteLoss(_out, lossBp), nowMs);

    /// <summary>Asks relayed member p to answer our punch at our endpoints (Node.Punch).</summary>
    internal void SendPunch(Peer p, long nowMs)
    {
        OwnEndpoints();
        if (_scratch.Count > 0) Send(p, ExchangeMessage.WritePunch(_out, _scratch), nowMs);
    }

    // A member's Punch: answer at each endpoint it named with a full datagram of our session (its
    // NAT was primed to expect exactly that). At most once per PunchAnswerIntervalMs per member, and
    // only to what the member itself (authenticated, end to end) told us.
    private void AnswerPunch(Peer p, long nowMs)
    {
        if (nowMs - p.LastPunchAnsweredMs < Tune.PunchAnswerIntervalMs || !p.HasReadySession(nowMs, Spec.RejectAfterTimeMs)) return;
        p.LastPunchAnsweredMs = nowMs;
        p.PunchesAnswered++;
        foreach (Endpoint e in _in.Endpoints) _node.SendProbe(p, e, 0, nowMs);
    }

    // Every revocation, ExchangeMessage.MaxRevocations to a message.
    private bool SendRevocations(Peer p, long nowMs)
    {
        int count = 0;
        foreach (Revocation r in _revoked.Values)
        {
            r.Write(_out.AsSpan(2 + count * Revocation.Len, Revocation.Len));
            if (++count < ExchangeMessage.MaxRevocations) continue;
            if (!SendRevoked(p, count, nowMs)) return false;
            count = 0;
        }
        return count == 0 || SendRevoked(p, count, nowMs);
    }

    private bool SendRevoked(Peer p, int count, long nowMs)
    {
        _out[0] = ExchangeMessage.TypeRevoked;
        _out[1] = (byte)count;
        return Send(p, 2 + count * Revocation.Len, nowMs);
    }

    internal long MembersMessagesSent, MembersEntriesSent;

    private bool SendMembers(Peer p, int len, int count, long nowMs)
    {
        MembersMessagesSent++;
        _out[0] = ExchangeMessage.TypeMembers;
        _out[1] = (byte)count;
        return Send(p, len, nowMs);
    }

    private bool Send(Peer p, int len, long nowMs)
    {
        if (!_node.SendControl(p, _out.AsSpan(0, len), nowMs)) return false;
        SentBytes += len;
        SentMessages++;
        return true;
    }

    private static void AddBounded(List<Endpoint> list, in Endpoint e, int max)
    {
        if (list.Count < max && e.IsSet && !list.Contains(e)) list.Add(e);
    }

    /// <summary>An exchange message from member p: checked whole, then applied.</summary>
    internal void Receive(Peer p, ReadOnlySpan<byte> payload, long nowMs)
    {
        if (!_in.Parse(payload))
        {
            Rejected++;
            _node.Counters.Drop(DropReason.BadExchange);
            if (_node.Log.Wants(LogLevel.Warn, "exchange_rejected"))
                _node.Log.Emit(LogLevel.Warn, "exchange_rejected", $"peer={p.Name} len={payload.Length} hint=\"a member sent a malformed or oversized exchange message; nothing of it was applied\"");
            return;
        }
        ReceivedMessages++;
        if (_in.Type == ExchangeMessage.TypeSelf) ApplySelf(p, nowMs);
        else if (_in.Type == ExchangeMessage.TypeMembers) ApplyMembers(p, nowMs);
        else if (_in.Type == ExchangeMessage.TypePunch) AnswerPunch(p, nowMs);
        else if (_in.Type == ExchangeMessage.TypePing) Send(p, ExchangeMessage.WritePing(_out, ExchangeMessage.TypePong, _in.PingId), nowMs);
        else if (_in.Type == ExchangeMessage.TypePong) _node.Ponged(p, _in.PingId);
        else if (_in.Type == ExchangeMessage.TypeIsolated) ApplyMarks(p, nowMs);
        else if (_in.Type == ExchangeMessage.TypeFecLoss) _node.LossReported(p, _in.LossBp, nowMs);
        else QueueRevocations();
    }

    private void ApplySelf(Peer p, long nowMs)
    {
        // A Self on a session we have told nothing on: p restarted (to us its handshake was a
        // rekey), so it knows nothing of us; tell it now rather than at the next interval.
        if (p.SelfSentOn != p.Current && p.ExchangeAtMs > nowMs + Tune.ExchangeDebounceMs) p.ExchangeAtMs = nowMs + Tune.ExchangeDebounceMs;
        bool exitRefused = _node.ExitRefused(p);
        AdoptName(p, _in.Name);
        // A name that --exit-for judges otherwise: p hears our default routes given or taken now.
        if (_node.ExitRefused(p) != exitRefused && p.ExchangeAtMs > nowMs + Tune.ExchangeDebounceMs) p.ExchangeAtMs = nowMs + Tune.ExchangeDebounceMs;
        p.OffersRelay = (_in.SelfFlags & ExchangeMessage.SelfRelays) != 0;
        p.ReachesAll = (_in.SelfFlags & ExchangeMessage.SelfReachesAll) != 0;
        p.HearsRefusals = (_in.SelfFlags & ExchangeMessage.SelfHearsRefusals) != 0;
        p.SelfHeard = true;
        if ((_in.SelfFlags & ExchangeMessage.SelfMarks) == 0) ClearMarks(p, nowMs);
        // p started since our last list; unless that list went on this session moments ago and p's
        // Self crossed it (both sides send Self and list as a session comes up: a whole list again
        // for every new pair of a forming mesh).
        bool crossed = p.MembersSentOn == p.Current && nowMs - p.MembersSentMs < Spec.RekeyTimeoutMs;
        if ((_in.SelfFlags & ExchangeMessage.SelfFresh) != 0 && p.MembersDigest != 0 && p.SelfSentOn != null && !crossed)
        {
            p.MembersDigest = 0;
            SendMemberList(p, nowMs);                                 // the list alone: nothing to list, nothing sent
        }
        p.Announced.Clear();
        foreach (Endpoint e in _in.Endpoints) p.Announced.Add(e);
        p.SeesUsAt = _in.Observed;
        if (_in.Observed.IsSet && !Observed.Contains(_in.Observed))
        {
            if (Observed.Count == MaxObserved) Observed.RemoveAt(0);
            Observed.Add(_in.Observed);         // told with the next exchange: members' own view of us matters more
        }
        var accepted = new List<Claim>();
        p.DefaultClaims.Clear();
        foreach (Claim c in _in.Claims) if (c.Prefix.Bits == 0 && p.DefaultClaims.Count < 2) p.DefaultClaims.Add(c);
        foreach (Claim c in _in.Claims)
        {
            string? why = Refusal(p, c.Prefix);
            if (why == null) { accepted.Add(c); continue; }
            // Two members that took one auto address at about the same time: the lower key keeps it,
            // so only we, with the higher key, move, and only within the grace after we took it (a
            // holder stays put) and for an address that is one of the claimant's own candidates.
            if (why == "our_address" && AutoAddressSinceMs >= 0 && nowMs - AutoAddressSinceMs < Tune.AutoAddressGraceMs &&
                AutoAddresses.Find(a => a.Host.Equals(c.Prefix)) is { Address: not null } mine &&
                p.PublicKey.SortsBefore(_node.Handshaker.PublicKey) &&
                AutoAddress.IsCandidate(p.PublicKey, new IpPrefix(mine.Address.GetAddressBytes(), mine.Bits), mine.Address))
                MoveAddress = (p, c);
            ClaimsRefused++;
            if (_node.Log.Wants(LogLevel.Warn, "claim_refused"))
                _node.Log.Emit(LogLevel.Warn, "claim_refused", $"peer={p.Name} prefix={c.Prefix} reason={why} hint=\"accept it with --accept {c.Prefix}, or --allow on that peer\"");
        }
        p.ClaimsExpireAtMs = nowMs + Tune.ClaimLifetimeMs;
        ReleasePins(p);
        if (SameClaims(accepted, p.Claims)) return;
        p.Claims.Clear();
        p.Claims.AddRange(accepted);
        _node.Log.Info("claims_changed", $"peer={p.Name} claims={accepted.Count}");
        _node.RebuildRoutes();
    }

    // A name, once announced with a key, stays with that key: a second key announcing it, or the
    // key announcing another name, is refused and logged (the peer keeps its earlier name).
    private void AdoptName(Peer p, string name)
    {
        var id = KeyId.Of(p.PublicKey);
        if (_keyName.TryGetValue(id, out string? pinned))
        {
            if (pinned == name) { if (p.Learned || p.Name == p.PublicKey.DefaultName()) p.Name = name; }   // a forgotten member back
            else if (_node.Log.Wants(LogLevel.Warn, "name_conflict"))
                _node.Log.Emit(LogLevel.Warn, "name_conflict", $"peer={p.Name} announced={name} pinned={pinned} reason=key_has_another_name");
            return;
        }
        bool taken = _nameOwner.TryGetValue(name, out KeyId owner) && owner != id;
        if (!taken)
            foreach (Peer q in _node.Peers)
                if (q.Active && q != p && q.Name == name) taken = true;
        if (taken || name == Name)
        {
            if (_node.Log.Wants(LogLevel.Warn, "name_conflict"))
                _node.Log.Emit(LogLevel.Warn, "name_conflict", $"peer={p.Name} announced={name} reason=name_has_another_key");
            return;
        }
        if (_keyName.Count >= Tune.MaxNamePins) return;
        _keyName[id] = name;
        _nameOwner[name] = id;
        if (p.Learned || p.Name == p.PublicKey.DefaultName()) p.Name = name;
    }

    /// <summary>Why p may not claim prefix (null: it may). Pins host addresses to the first claimant.</summary>
    internal string? Refusal(Peer p, IpPrefix prefix)
    {
        foreach (IpPrefix own in OwnHosts)
            if (own.Equals(prefix)) return "our_address";
        foreach (IpPrefix a in p.Allowed)
            if (a.Covers(prefix)) return null;
        if (prefix.Bits == 0 && ExitNode != null) return p.Is(ExitNode) ? null : "not_our_exit_node";
        // A host address inside the network belongs to its first claimant even under a broad
        // --accept (an exit node's 0.0.0.0/0 must not let one member take another's address).
        bool inNetwork = false;
        foreach (IpPrefix n in Networks) inNetwork |= n.Covers(prefix);
        if (!inNetwork || prefix.Bits != prefix.MaxBits)
        {
            foreach (IpPrefix a in Accept)
                if (a.Covers(prefix)) return null;
            return prefix.Bits == 0 ? "default_route_not_accepted" : inNetwork || prefix.Bits != prefix.MaxBits ? "not_accepted" : "outside_network";
        }
        var id = KeyId.Of(p.PublicKey);
        if (_addressOwner.TryGetValue(prefix, out KeyId owner)) return owner == id ? null : "address_of_another_member";
        foreach (Peer q in _node.Peers)
            if (q.Active && q != p)
                foreach (IpPrefix a in q.Allowed)
                    if (a.Covers(prefix)) return "address_of_another_member";
        if (_addressOwner.Count >= Tune.MaxNamePins) return "too_many_addresses";
        _addressOwner[prefix] = id;
        return null;
    }

    /// <summary>After a reload: drops the claims the new policy no longer accepts; true if any went.</summary>
    internal bool Recheck(Peer p)
    {
        int removed = p.Claims.RemoveAll(c => Refusal(p, c.Prefix) != null);
        if (removed > 0) _node.Log.Info("claims_withdrawn", $"peer={p.Name} claims={removed} reason=policy_changed");
        return removed > 0;
    }

    // An address a member no longer claims is free for another (one that moved off a collision).
    private void ReleasePins(Peer p)
    {
        var id = KeyId.Of(p.PublicKey);
        List<IpPrefix>? gone = null;
        foreach (var (prefix, owner) in _addressOwner)
            if (owner == id && !_in.Claims.Exists(c => c.Prefix.Equals(prefix))) (gone ??= new()).Add(prefix);
        foreach (IpPrefix prefix in gone ?? []) _addressOwner.Remove(prefix);
    }

    /// <summary>Drops the pins of a forgotten member's addresses (its name stays bound to its key).</summary>
    internal void Forget(Peer p)
    {
        var id = KeyId.Of(p.PublicKey);
        if (_marksBy.Remove(id)) MarksChanged(p.Name, 0);        // a peer no longer ours marks nobody for us
        var mine = new List<IpPrefix>();
        foreach (var (prefix, owner) in _addressOwner)
            if (owner == id) mine.Add(prefix);
        foreach (IpPrefix prefix in mine) _addressOwner.Remove(prefix);
    }

    private void ApplyMembers(Peer from, long nowMs)
    {
        from.MembersHeard = true;
        foreach (var (key, agoS, first, count) in _in.Members)
        {
            if (key.EqualsCt(_node.Handshaker.PublicKey) || IsRevoked(key) || Refuses(key)) continue;
            long seenMs = nowMs - Math.Min(agoS, (uint)(Tune.ForgetMemberAfterMs / 1000)) * 1000L;
            Peer? q = _node.FindPeer(key);
            if (q == from) continue;
            if (q == null)
            {
                if (!Open || nowMs - seenMs >= Tune.ForgetMemberAfterMs) continue;
                q = _node.AddLearned(key, nowMs, provisional: false);
                if (q == null) continue;
                MembersLearned++;
                _node.Log.Info("member_learned", $"peer={q.Name} via={from.Name} endpoints={count}");
            }
            q.LastSeenMs = Math.Max(q.LastSeenMs, seenMs);
            if (from.OffersRelay && from.Relay == null)           // from has q up: it can carry q
            {
                bool back = q.RelayOfferMs <= q.DownAtMs;         // first told of since q went down (or ever)
                q.RelayOffer = from;
                q.RelayOfferMs = nowMs;
                if (back && !q.Up && q.Pending == null) q.ReconnectAtMs = nowMs + FirstHelloWaitMs(q);
            }
            if (q.Up) continue;
            for (int i = 0; i < count; i++)
            {
                Endpoint e = _in.MemberEndpoints[first + i];
                if (q.Candidates.Contains(e)) continue;
                if (q.Candidates.Count == Tune.MaxEndpointsPerMember) q.Candidates.RemoveAt(0);
                q.Candidates.Add(e);
            }
            if (!q.Endpoint.IsSet && q.Candidates.Count > 0) q.Endpoint = q.Candidates[0];
            if ((q.Endpoint.IsSet || q.RelayOffer != null) && q.Pending == null && q.ReconnectAtMs == 0) q.ReconnectAtMs = nowMs + FirstHelloWaitMs(q);
        }
    }

    // Both members of a pair hear of each other from the same lists at the same moment; if both
    // said hello, every pair would cost two handshakes (four X25519 operations each side), which
    // is what held a 100-node mesh on two cores at full CPU. The lower key says hello at once; the
    // higher one only when no hello of the other came within MemberHelloYieldMs.
    private long FirstHelloWaitMs(Peer q) =>
        _node.Handshaker.PublicKey.SortsBefore(q.PublicKey) ? 0 : Tune.MemberHelloYieldMs;
}

/// <summary>The node's membership (§15): members learned and forgotten, up and down, and the route election.</summary>
internal sealed partial class Node
{
    /// <summary>A member learned from the mesh (null when the table is full or the key unusable).
    /// Two kinds hold slots without having proven anything: provisional members (a ClientHello not
    /// yet confirmed) and members only others reported (never heard from). When the provisional
    /// table is full its oldest entry makes room, so strangers flooding hellos cannot keep a real
    /// member out; reported members take at most half the table and give their slot, oldest first,
    /// to a handshake, so reports cannot lock real members out. Neither kind has routes, so
    /// displacing one needs no route rebuild.</summary>
    internal Peer? AddLearned(in Key32 key, long nowMs, bool provisional)
    {
        int active = 0, provisionals = 0, reported = 0;
        Peer? oldestProvisional = null, oldestReported = null;
        foreach (Peer q in Peers)
        {
            if (!q.Active) continue;
            active++;
            if (q.Provisional)
            {
                provisionals++;
                if (oldestProvisional == null || q.CreatedMs < oldestProvisional.CreatedMs) oldestProvisional = q;
            }
            else if (q.Learned && q.LastRxMs < 0)
            {
                reported++;
                if (oldestReported == null || q.CreatedMs < oldestReported.CreatedMs) oldestReported = q;
            }
        }
        Peer? displace = null;
        if (!provisional) { if (reported >= Tune.MaxPeers / 2 || active >= Tune.MaxPeers) return null; }
        else if (provisionals >= Tune.MaxProvisionalPeers) displace = oldestProvisional;
        else if (active >= Tune.MaxPeers && (displace = oldestReported) == null) return null;
        if (displace != null) RemovePeer(displace, "displaced");
        var pc = new PeerConfig { PublicKey = key };
        Peer p;
        try { p = AddPeer(pc, _psk, _keepaliveMs); }
        catch (ConfigException) { return null; }
        p.OnLearned(provisional);
        p.CreatedMs = nowMs;
        return p;
    }

    /// <summary>Recomputes the trie from every peer's --allow prefixes and accepted claims. Per
    /// prefix the winner is: a peer that is up, then (a configured prefix of a peer that is not up
    /// keeps its route, so traffic queues and starts a handshake), then the lowest metric (--allow
    /// counts as 0), then the lowest public key, so every node picks the same owner. Claims of a
    /// peer that is down are withdrawn. Runs on changes only; the packet path just reads the trie.</summary>
    internal void RebuildRoutes()
    {
        var best = new Dictionary<IpPrefix, RouteEntry>();
        foreach (Peer p in Peers)
        {
            if (!p.Active) continue;
            foreach (IpPrefix a in p.Allowed) Offer(best, new RouteEntry(a, p.Id, 0, false, p.Up ? 0 : 1));
            if (p.Up)
                foreach (Claim c in p.Claims) Offer(best, new RouteEntry(c.Prefix, p.Id, c.Metric, true, 0));
        }
        var trie = new RouteTrie();
        var list = new List<RouteEntry>(best.Count);
        foreach (RouteEntry e in best.Values)
        {
            trie.Insert(e.Prefix, e.PeerId);
            list.Add(e);
        }
        list.Sort((x, y) => x.Prefix.IsV6 != y.Prefix.IsV6 ? (x.Prefix.IsV6 ? 1 : -1) : x.Prefix.Value != y.Prefix.Value ? x.Prefix.Value.CompareTo(y.Prefix.Value) : x.Prefix.Bits - y.Prefix.Bits);
        Routes = trie;
        RouteList = list;
        RoutesVersion++;
        Signal.Poke();                                               // the loop syncs the kernel's routes
    }

    private void Offer(Dictionary<IpPrefix, RouteEntry> best, RouteEntry e)
    {
        if (!best.TryGetValue(e.Prefix, out RouteEntry cur) || Better(e, cur)) best[e.Prefix] = e;
    }

    private bool Better(RouteEntry a, RouteEntry b)
    {
        if (a.Rank != b.Rank) return a.Rank < b.Rank;
        if (a.Metric != b.Metric) return a.Metric < b.Metric;
        return Peers[a.PeerId].PublicKey.SortsBefore(Peers[b.PeerId].PublicKey);
    }

    // The source check's second chance: the route for a prefix went to another claimant (HA pairs),
    // but this peer's own accepted prefixes still vouch for the packet's source.
    private static bool PeerServes(Peer p, ReadOnlySpan<byte> source)
    {
        foreach (IpPrefix a in p.Allowed) if (a.Contains(source)) return true;
        if (p.Up) foreach (Claim c in p.Claims) if (c.Prefix.Contains(source)) return true;
        return false;
    }

    private void MarkUp(Peer p, long nowMs)
    {
        p.OnConfirmed();
        p.Remembered = false;
        p.Reconnecting = false;
        p.ReconnectAttempts = 0;
        p.ReconnectAtMs = 0;
        p.LastSeenMs = p.UpAtMs = nowMs;
        if (p.LivenessMs > 0) p.LivenessAtMs = nowMs + p.LivenessMs;
        Log.Info("peer_up", $"peer={p.Name} endpoint={p.Endpoint} path={p.PathName}{(p.Learned ? " source=learned" : "")}");
        if (p.Relay != null) { p.PunchAttempts = 0; p.PunchAtMs = nowMs + Tune.FirstPunchMs; }
        if (p.Allowed.Count > 0 || p.Claims.Count > 0) RebuildRoutes();
        ScheduleExchange(nowMs);                // the others learn of a new member
        Mesh.SendTo(p, nowMs);                  // (and p itself hears from us now, not after the debounce)
    }

    private void MarkDown(Peer p, long nowMs, string reason)
    {
        p.LivenessAtMs = 0;
        if (!p.Up) return;
        p.OnLost();
        p.DownAtMs = nowMs;
        p.ExchangeAtMs = p.PunchAtMs = 0;
        StopRelayingThrough(p);
        p.RevocationsSentVersion = -1;                              // back up, it hears them all again
        p.SelfHeard = false;
        Signal.Poke();                                               // a learned member's forget deadline starts
        Log.Info("peer_down", $"peer={p.Name} reason={reason} claims_withdrawn={p.Claims.Count}");
        if (p.Allowed.Count > 0 || p.Claims.Count > 0) RebuildRoutes();
        ScheduleExchange(nowMs);
    }

    /// <summary>Something we tell members changed: tell every member that is up, soon (debounced).</summary>
    internal void ScheduleExchange(long nowMs)
    {
        long at = nowMs + Tune.ExchangeDebounceMs;
        foreach (Peer p in Peers)
            if (p.Active && p.Up && (p.ExchangeAtMs == 0 || p.ExchangeAtMs > at)) p.ExchangeAtMs = at;
    }

    /// <summary>Seals payload in a Control record to p; false when p has no ready session.</summary>
    internal bool SendControl(Peer p, ReadOnlySpan<byte> payload, long nowMs)
    {
        if (!CanSend(p, nowMs)) return false;
        Session s = p.Current!;
        Span<byte> slot = NextOut(p, nowMs);
        payload.CopyTo(slot[Record.PayloadOffset..]);
        int len = Record.Seal(s, slot, payload.Length, RecordFlags.Control, Mtu);
        CommitOut(p, len, nowMs);
        AfterSend(p, s, len, nowMs, carriesData: false);
        return true;
    }
}

/// <summary>The node's memory of members (--state), for a restart while its --peer is down.</summary>
internal sealed partial class Node
{
    // The state file (--state): the members this node learned, for a restart while its --peer
    // is down. The daemon writes it rarely (a flash write budget) and atomically; see MemberState.

    internal const string StateHeader = "veil-state 1";
    private static readonly System.Buffers.SearchValues<char> NameChars =
        System.Buffers.SearchValues.Create("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.");
    internal const int MaxStateMembers = Tune.MaxPeers / 2;     // what reports may fill, no more

    /// <summary>The learned members we spoke with, one line each: "member KEY NAME EP[,EP...]",
    /// where it was last heard from first, then what it announced (at most 4).</summary>
    internal string StateText()
    {
        var sb = new StringBuilder("# veil: the members this node learned, read at start when its peers are down. Written by veil.\n");
        sb.Append(StateHeader).Append('\n');
        foreach (IfAddress a in Mesh.AutoAddresses) sb.Append("address ").Append(a).Append('\n');
        Mesh.WriteMarks(sb);
        var eps = new List<Endpoint>();
        int n = 0;
        foreach (Peer p in Peers)
        {
            if (!p.Active || !p.Learned || p.Provisional || p.LastRxMs < 0 || n == MaxStateMembers) continue;
            eps.Clear();
            if (p.Endpoint.IsSet && !TcpLinks.IsTcp(p.Endpoint)) eps.Add(p.Endpoint);
            foreach (Endpoint e in p.Announced) if (eps.Count < Tune.MaxEndpointsPerEntry && !eps.Contains(e)) eps.Add(e);
            if (eps.Count == 0) continue;
            sb.Append("member ").Append(p.PublicKey.ToBase64()).Append(' ').Append(p.Name).Append(' ').Append(string.Join(',', eps)).Append('\n');
            n++;
        }
        return sb.ToString();
    }

    /// <summary>Reads a state file's text: every line is checked first, and one bad line refuses the
    /// whole file (null: fine, else why). Each member becomes a learned member to reconnect to, its
    /// endpoints candidates; a configured peer only gains the candidates; our own key, a revoked
    /// one, or a member under an explicit policy that does not trust it is left out.</summary>
    internal string? LoadState(string text, long nowMs, out int restored)
    {
        restored = 0;
        var members = new List<(Key32 Key, string Name, List<Endpoint> Eps)>();
        var marks = new List<(Key32 By, List<Key32> Keys)>();
        bool header = false;
        int lineNo = 0;
        foreach (string raw in text.Split('\n'))
        {
            lineNo++;
            string line = raw.Trim();
            if (line.Length == 0 || line[0] == '#') continue;
            if (!header) { if (line != StateHeader) return $"line {lineNo}: expected '{StateHeader}'"; header = true; continue; }
            string[] f = line.Split(' ');
            // Our --address auto choice, read by the config (AutoAddress.Choose), not here.
            if (f.Length == 2 && f[0] == "address") { if (!IfAddress.TryParse(f[1], out _)) return $"line {lineNo}: bad address"; continue; }
            if (f[0] == "isolated")
            {
                var keys = new List<Key32>();
                if (f.Length < 3 || f.Length > 2 + Tune.MaxMarksPerMember || !Key32.TryParseBase64(f[1], out Key32 by) || marks.Count == Tune.MaxMarkingMembers)
                    return $"line {lineNo}: expected 'isolated MARKER KEY...'";
                for (int i = 2; i < f.Length; i++)
                {
                    if (!Key32.TryParseBase64(f[i], out Key32 k)) return $"line {lineNo}: bad key '{f[i]}'";
                    keys.Add(k);
                }
                marks.Add((by, keys));
                continue;
            }
            if (f.Length != 4 || f[0] != "member" || !Key32.TryParseBase64(f[1], out Key32 key)) return $"line {lineNo}: expected 'member KEY NAME ENDPOINTS'";
            if (f[2].Length is 0 or > ExchangeMessage.MaxNameLen || f[2].AsSpan().IndexOfAnyExcept(NameChars) >= 0) return $"line {lineNo}: bad name";
            var eps = new List<Endpoint>();
            foreach (string e in f[3].Split(','))
            {
                if (!Endpoint.TrySplitHostPort(e, out string host, out int port) || !IPAddress.TryParse(host, out IPAddress? ip)) return $"line {lineNo}: bad endpoint '{e}'";
                Endpoint ep = Endpoint.FromIp(ip, port);
                if (TcpLinks.IsTcp(ep) || eps.Count == Tune.MaxEndpointsPerEntry) return $"line {lineNo}: bad endpoint '{e}'";
                eps.Add(ep);
            }
            if (members.Count == MaxStateMembers) return $"line {lineNo}: more than {MaxStateMembers} members";
            members.Add((key, f[2], eps));
        }
        foreach (var (by, keys) in marks) Mesh.LoadMarks(by, keys, nowMs);   // first: Remember refuses what they mark
        foreach (var (key, name, eps) in members)
            if (Remember(key, name, eps, nowMs)) restored++;
        return null;
    }

    /// <summary>A member known from the state file or a beacon: to reconnect to, at these endpoints.
    /// Our own key, a revoked one, and (explicit policy) an unknown one are left out (false).</summary>
    internal bool Remember(in Key32 key, string? name, List<Endpoint> eps, long nowMs)
    {
        if (eps.Count == 0 || key.EqualsCt(Handshaker.PublicKey) || Mesh.IsRevoked(key) || Mesh.Refuses(key)) return false;
        Peer? p = FindPeer(key);
        if (p == null)
        {
            if (!Mesh.Open || (p = AddLearned(key, nowMs, provisional: false)) == null) return false;
            p.Remembered = true;
            p.LastSeenMs = nowMs;
            if (name != null && !Peers.Exists(q => q != p && q.Active && q.Name == name)) p.Name = name;
        }
        foreach (Endpoint e in eps)
            if (!p.Candidates.Contains(e) && p.Candidates.Count < Tune.MaxEndpointsPerMember) p.Candidates.Add(e);
        if (!p.Endpoint.IsSet) p.Endpoint = eps[0];
        if (!p.Up && p.Pending == null && p.ReconnectAtMs == 0) p.ReconnectAtMs = nowMs;
        return true;
    }
}

/// <summary>The daemon's side of membership: the state file, written rarely and atomically, and
/// revocations, checked off the node's lock and kept in _cfg.RevocationsPath.</summary>
internal sealed unsafe partial class Daemon
{
    private string _stateWritten = "";
    private long _stateWrittenMs = long.MinValue / 2;
    private long _marksWrittenVersion;
    private const long StateWriteIntervalMs = 600_000;     // at most one flash write per 10 minutes, and at exit

    private string? ReadState()
    {
        string? path = _cfg.StatePath;
        if (path == null || !File.Exists(path)) return null;
        try { return _stateWritten = File.ReadAllText(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            _log.Warn("state_ignored", $"file={path} error=\"{e.Message}\"");
            return null;
        }
    }

    private void ApplyState(Node node, string text, long nowMs)
    {
        string? error = node.LoadState(text, nowMs, out int restored);
        if (error != null) _log.Warn("state_ignored", $"file={_cfg.StatePath} error=\"{error}\" hint=\"nothing of it was used; it is rewritten once members are known\"");
        else _log.Info("state_loaded", $"file={_cfg.StatePath} members={restored}");
    }

    // On the loop: the snapshot is taken under the lock, and written by the chores thread (or here,
    // at exit) when it changed and the last write is old enough.
    private void SaveState(bool force)
    {
        string? path = _cfg.StatePath;
        if (path == null) return;
        long nowMs = Mono.NowMs();
        string text;
        lock (_node!.Gate)
        {
            // Isolation marks are written within a minute, not ten: a restart must not forget them.
            if (!force && nowMs - _stateWrittenMs < StateWriteIntervalMs && _node.Mesh.MarksVersion == _marksWrittenVersion) return;
            _marksWrittenVersion = _node.Mesh.MarksVersion;
            text = _node.StateText();
        }
        if (text == _stateWritten || text.IndexOf("\nmember ", StringComparison.Ordinal) < 0 && text.IndexOf("\naddress ", StringComparison.Ordinal) < 0
            && text.IndexOf("\nisolated ", StringComparison.Ordinal) < 0 && _stateWritten.IndexOf("\nisolated ", StringComparison.Ordinal) < 0) return;   // unchanged, or nothing to remember (nor to forget)
        _stateWritten = text;
        _stateWrittenMs = nowMs;
        if (force) WriteAtomically(path, text, _log, "state_not_saved");
        else _chores!.Post(() => WriteAtomically(path, text, _log, "state_not_saved"));
    }


    // Under the node's lock: a member with a lower key claims our --address auto address. What is
    // taken is noted here; the next free candidate goes on the TUN on the chores thread (netlink),
    // then the mesh announces it and the state file keeps it.
    private void PostAddressMove(Peer by, Claim claim)
    {
        Node node = _node!;
        int at = _cfg.Addresses.FindIndex(a => a.Host.Equals(claim.Prefix));
        if (at < 0) return;
        IfAddress old = _cfg.Addresses[at];
        var taken = new HashSet<IPAddress> { old.Address };
        foreach (Peer p in node.Peers)
            if (p.Active)
                foreach (Claim c in p.Claims)
                    if (c.Prefix.Bits == c.Prefix.MaxBits)
                    {
                        byte[] a = new byte[c.Prefix.IsV6 ? 16 : 4];
                        c.Prefix.WriteAddress(a);
                        taken.Add(new IPAddress(a));
                    }
        Key32 pub = node.Handshaker.PublicKey;
        int ifIndex = _tun!.IfIndex;
        var addresses = new List<IfAddress>(_cfg.Addresses);
        _chores!.Post(() =>
        {
            IfAddress? next = AutoAddress.Next(pub, new IpPrefix(old.Address.GetAddressBytes(), old.Bits), taken.Contains);
            string? error = next == null ? $"none of the first {AutoAddress.MaxCandidates} candidates is free" : null;
            if (next != null)
                try
                {
                    // Old first: removing an IPv4 primary address takes its secondaries with it
                    // (unless promote_secondaries), and the new one would be a secondary.
                    Netlink.RemoveAddress(ifIndex, old);
                    // Removing the TUN's last address of a family takes that family's routes with it.
                    if (!addresses.Exists(a => a.IsV6 == old.IsV6 && !a.Equals(old))) _kernelRoutes!.Flushed(old.IsV6);
                    try { Netlink.AddAddress(ifIndex, next.Value); }
                    catch (IOException)
                    {
                        Netlink.AddAddress(ifIndex, old);                // put back: the node keeps an address
                        throw;
                    }
                }
                catch (IOException e) { error = e.Message; }
            if (error != null) { _log.Warn("address_not_moved", $"address={old} error=\"{error}\""); _chores.Return(() => _routesPostedVersion = -1); return; }
            _chores.Return(() =>
            {
                _routesPostedVersion = -1;                // the routes go back on the TUN with the next Sync
                lock (node.Gate)
                {
                    int i = _cfg.Addresses.IndexOf(old);
                    if (i >= 0) _cfg.Addresses[i] = next!.Value;
                    if (node.Mesh.Configure(_cfg)) node.ScheduleExchange(Mono.NowMs());
                    node.Mesh.AutoAddressSinceMs = Mono.NowMs();
                    // The claim we refused as ours is the other member's now, without waiting a minute
                    // for its next announcement.
                    if (by.Active && !by.Claims.Contains(claim) && node.Mesh.Refusal(by, claim.Prefix) == null) { by.Claims.Add(claim); node.RebuildRoutes(); }
                }
                _log.Warn("address_moved", $"from={old} to={next} peer={by.Name} reason=collision hint=\"a member with a lower key has {old.Address}; this node's new address is kept in the state file\"");
                _stateWrittenMs = long.MinValue / 2;      // written now, not in ten minutes
                SaveState(force: false);
            });
        });
    }

    // At start-up: what the file holds, each line checked against the admin key.
    private void LoadRevocations(Node node)
    {
        string? path = _cfg.RevocationsPath;
        if (path == null || !File.Exists(path)) return;
        string[] lines;
        try { lines = File.ReadAllLines(path); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            _log.Warn("revocations_unreadable", $"file={path} error=\"{e.Message}\" hint=\"members revoked before are not refused until a member tells us again\"");
            return;
        }
        int kept = 0;
        for (int i = 0; i < lines.Length; i++)
        {
            if (lines[i].Trim().Length == 0) continue;
            Revocation? r = Revocation.Decode(lines[i]);
            if (r == null || _cfg.AdminKey == null || !r.Verify(_cfg.AdminKey))
            {
                _log.Warn("revocation_invalid", $"file={path} line={i + 1} hint=\"not signed by this network's admin key; ignored\"");
                continue;
            }
            if (node.Mesh.Revoke(r, Mono.NowMs())) kept++;
        }
        _log.Info("revocations_loaded", $"file={path} count={kept}");
    }

    // On the chores thread: signatures checked, the good ones applied (on the loop) and written down.
    private void CheckRevocations(List<Revocation> unverified)
    {
        byte[]? admin = _cfg.AdminKey;
        var good = new List<Revocation>();
        foreach (Revocation r in unverified)
            if (admin != null && r.Verify(admin)) good.Add(r);
        int rejected = unverified.Count - good.Count;
        if (rejected > 0) _log.Warn("revocation_rejected", $"count={rejected} hint=\"a member passed on revocations this network's admin key did not sign\"");
        _chores!.Return(() =>
        {
            var applied = new List<Revocation>();
            lock (_node!.Gate)
            {
                _node.Mesh.RevocationsRejected += rejected;
                foreach (Revocation r in good) if (_node.Mesh.Revoke(r, Mono.NowMs())) applied.Add(r);
                _worker!.FlushUdp(_node.UdpOut);
            }
            if (applied.Count > 0) _chores.Post(() => WriteRevocations(applied));
        });
    }

    // On the chores thread: appended and synced, so a restart still refuses them.
    private void WriteRevocations(List<Revocation> revocations)
    {
        string? path = _cfg.RevocationsPath;
        if (path == null) return;
        var text = new StringBuilder();
        foreach (Revocation r in revocations) text.Append(r.Encode()).Append('\n');
        try
        {
            using var fs = new FileStream(path, FileMode.Append, FileAccess.Write, FileShare.Read, 4096, FileOptions.None);
            File.SetUnixFileMode(path, (UnixFileMode)0b110_000_000);
            fs.Write(Encoding.ASCII.GetBytes(text.ToString()));
            fs.Flush(flushToDisk: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            _log.Error("revocations_not_saved", $"file={path} error=\"{e.Message}\" hint=\"they hold until a restart\"");
        }
    }

    /// <summary>Answers `veil revoke`: "revoke LINE", a revocation signed by the admin.</summary>
    internal string Revoke(string request)
    {
        Revocation? r = Revocation.Decode(request["revoke ".Length..]);
        if (r == null) return "error: malformed revocation\n";
        if (_cfg.AdminKey == null) return "error: this node names no admin key (admin = \"...\" in its config), so it cannot check a revocation\n";
        if (!r.Verify(_cfg.AdminKey)) return "error: the revocation is not signed by this network's admin key\n";
        bool applied;
        lock (_node!.Gate)
        {
            applied = _node.Mesh.Revoke(r, Mono.NowMs());
            _worker!.FlushUdp(_node.UdpOut);
        }
        if (!applied) return $"ok: {r.Key.ToBase64()} was revoked already\n";
        _chores!.Post(() => WriteRevocations([r]));
        return $"ok: revoked {r.Key.ToBase64()}; members hear of it with their next exchange\n";
    }
}

// ==== 16. NAT traversal: relay, punching, port mapping & beacons =================================
// How members reach each other when NATs stand between them. Four means, cheapest first:
// port mapping (PortMapper asks the gateway of the default route, by PCP, NAT-PMP or UPnP IGD, to
// forward our UDP port; the mapped endpoint is announced to members in Self), hole punching
// (Node.Punch: both sides send to each other's endpoints at once, primed with TTL-limited datagrams
// that open our own NAT without reaching theirs), relaying (a member with direct sessions to both
// carries their records, sealed end to end, in Relay records; Relays bounds what it carries), and
// beacons (a sealed list of our endpoints in a file or a command's output, for members that lost
// every path to us). Each authenticated record tells the node which path works (Node.Heard): the
// first direct one moves a relayed peer off the relay at once, and a direct path that dies falls
// back to the relay. Nothing here trusts an unauthenticated datagram: a path changes only on an
// authenticated record, a relay cannot read, forge or replay what it carries, and every table is
// bounded. May call §2–15.

/// <summary>What this node carries for other members as a relay (--relay, the default): pairs of
/// members, each direction with its own byte budget per second, at most MaxRelayPairs pairs; every
/// record it will not carry is counted. The records it carries are sealed end to end between the
/// two members: it can drop or delay them, never read, forge or replay them unnoticed.</summary>
internal sealed class Relays
{
    internal bool Offered = true;
    internal long RateBytesPerS = Tune.DefaultRelayRateMbit * 125_000L;
    private sealed class Flow { internal long Tokens, LastMs; }
    private readonly Dictionary<(int From, int To), Flow> _flows = new();
    internal long Bytes, Records, Refused, RateLimited, RefusalsTold, RefusalsHeard;

    internal int Pairs => _flows.Count;

    internal void Configure(UpConfig cfg)
    {
        Offered = cfg.Relay && !cfg.Isolate;            // an isolating node carries nothing between members
        RateBytesPerS = cfg.RelayRateMbit * 125_000L;
    }

    /// <summary>May `from` send `len` bytes to `to` through us now? Charges the flow's budget; null
    /// when it may, else the reason it may not.</summary>
    internal string? Admit(Peer from, Peer to, int len, long nowMs)
    {
        if (!_flows.TryGetValue((from.Id, to.Id), out Flow? f))
        {
            if (_flows.Count >= 2 * Tune.MaxRelayPairs && !EvictIdle(nowMs)) return "pairs_full";
            f = new Flow { Tokens = RateBytesPerS, LastMs = nowMs };
            _flows[(from.Id, to.Id)] = f;
        }
        f.Tokens = Math.Min(RateBytesPerS, f.Tokens + (nowMs - f.LastMs) * RateBytesPerS / 1000);
        f.LastMs = nowMs;
        if (f.Tokens < len) { RateLimited++; return "rate"; }
        f.Tokens -= len;
        Bytes += len;
        Records++;
        return null;
    }

    private bool EvictIdle(long nowMs)
    {
        foreach (var (k, f) in _flows)
            if (nowMs - f.LastMs >= Tune.RelayPairIdleMs) { _flows.Remove(k); return true; }
        return false;
    }

    /// <summary>A member that is gone: its flows go too (its slot id may be reused).</summary>
    internal void Forget(Peer p)
    {
        var gone = new List<(int, int)>();
        foreach (var k in _flows.Keys) if (k.From == p.Id || k.To == p.Id) gone.Add(k);
        foreach (var k in gone) _flows.Remove(k);
    }
}

/// <summary>The node's paths: each record to a peer goes straight to its endpoint or through
/// a member that relays; each authenticated record says which path works (Heard), and punch rounds
/// move a relayed peer to a direct path as soon as one opens.</summary>
internal sealed partial class Node
{
    // A Relay record's payload: Forward (to the relay): 1 ‖ key of the member it is for (32) ‖ inner
    // datagram; Delivered (from the relay): 2 ‖ inner datagram; Refused (from the relay): 3 ‖ key of
    // the member a ClientHello was for, which it did not carry. The inner datagram is a handshake
    // message or a transport record between the two members; who sent it, its inner keys say.
    internal const byte RelayForward = 1, RelayDelivered = 2, RelayRefused = 3;
    internal const int RelayHeadroomLen = Record.PayloadOffset + 1 + Spec.KeyLen;
    private Peer? _via;                          // the relay of the datagram being handled (null: direct)
    internal TcpLinks? Tcp;                      // --listen-tcp / --peer-tcp (the daemon's)
    internal long LastUdpRxMs;                   // the last authenticated record straight from a UDP endpoint

    /// <summary>A TCP link went away: peers that were on it go back to where they were before it
    /// (a client: its UDP endpoint, and the retries decide again), or to nowhere (a server's side).</summary>
    internal void TcpGone(in Endpoint link, long nowMs)
    {
        foreach (Peer p in Peers)
        {
            if (!p.Endpoint.Equals(link)) continue;
            p.Endpoint = p.EndpointBeforeTcp;
            p.EndpointBeforeTcp = default;
            Log.Info("tcp_closed", $"peer={p.Name} reason={Tcp?.LastCloseReason}");
            if (p.Up) p.HelloUnanswered = true;                 // its next hello tries the other paths
        }
    }

    /// <summary>p (down or gone) relays for nobody now: peers that went or would go through it go direct.</summary>
    private void StopRelayingThrough(Peer p)
    {
        foreach (Peer q in Peers)
        {
            if (q.Relay == p) q.Relay = null;
            if (q.RelayOffer == p) q.RelayOffer = null;
        }
    }

    /// <summary>Has a session and a way to send on it: an endpoint, or a relay that is up.</summary>
    internal bool CanSend(Peer p, long nowMs) =>
        p.HasReadySession(nowMs, Spec.RejectAfterTimeMs) && (p.Endpoint.IsSet || PathRelay(p, nowMs) != null);

    /// <summary>The member our records to p go through now; null: straight to p.Endpoint.</summary>
    internal Peer? PathRelay(Peer p, long nowMs) => p.Relay is Peer r && Direct(r, nowMs) ? r : null;

    // Up with a session, straight to its endpoint: what a relay must be, and what it relays to.
    private static bool Direct(Peer r, long nowMs) =>
        r.Up && r.Relay == null && r.Endpoint.IsSet && r.HasReadySession(nowMs, Spec.RejectAfterTimeMs);

    private static bool CanRelay(Peer r, long nowMs) => r.Active && r.OffersRelay && Direct(r, nowMs);

    /// <summary>Before a handshake: a peer that nothing came from directly for DirectQuietMs is
    /// tried through a member that reported it and relays. Relay first, then punch: the direct tries
    /// that make NAT routers map the wrong way (the simultaneous-open clash) are never sent. A
    /// hello to a peer that is down that went unanswered is followed by one on the other path, so a
    /// relay that drops hellos (full, or gone) costs one retransmit delay, never the handshake.</summary>
    private void ChoosePath(Peer p, long nowMs)
    {
        bool flip = p.HelloUnanswered && !p.Up;
        p.HelloUnanswered = false;
        if (flip && Tcp != null && p.TcpRemote.IsSet && !TcpLinks.IsTcp(p.Endpoint) && nowMs - LastUdpRxMs >= Tune.TcpFallbackMs)
        {
            Endpoint link = Tcp.Connect(p.TcpRemote, nowMs);      // UDP gets no answer from anyone: try its TCP port
            if (link.IsSet)
            {
                p.EndpointBeforeTcp = p.Endpoint;
                p.Endpoint = link;
                p.Relay = null;
                Log.Info("path_tcp", $"peer={p.Name} connect={p.TcpRemote} udp_silent_s={(nowMs - LastUdpRxMs) / 1000}");
                return;
            }
        }
        if (p.Relay != null && (PathRelay(p, nowMs) == null || flip && p.Endpoint.IsSet)) { p.Relay = null; return; }
        if (p.Relay != null || p.RelayOffer is not Peer r || !CanRelay(r, nowMs) || !flip && nowMs - p.LastDirectRxMs < Tune.DirectQuietMs) return;
        p.Relay = r;
        if (!flip) Log.Info("path_relay", $"peer={p.Name} relay={r.Name} reason=handshake");
    }

    // An authenticated record of p arrived: directly from `from`, or through _via. Direct wins at
    // once (roaming, and a punch that worked); a relay takes over only when direct has gone quiet.
    private void Heard(Peer p, in Endpoint from, int len, long nowMs)
    {
        if (_via == p) return;
        if (_via == null)
        {
            if (!p.Endpoint.Equals(from) && p.Endpoint.IsSet && !TcpLinks.IsTcp(from) && !TcpLinks.IsTcp(p.Endpoint))
            {
                p.PreviousEndpoint = p.Endpoint;         // roamed (a NAT rebinding, a new uplink)
                p.EndpointChanges++;
                Log.Info("endpoint_changed", $"peer={p.Name} endpoint={from} was={p.Endpoint}");   // authenticated and rare: a hook may want it
            }
            p.Endpoint = from;
            p.LastDirectRxMs = nowMs;
            if (!TcpLinks.IsTcp(from)) LastUdpRxMs = nowMs;
            else Tcp?.Touch(from, nowMs);
            if (p.Relay == null) return;
            Log.Info("path_direct", $"peer={p.Name} endpoint={from} was=relay:{p.Relay.Name} punches={p.PunchesSent}");
            p.Relay = null;
            p.PunchAtMs = 0;
            p.SendKeepaliveAtMs = nowMs;                 // tell p now, so its side moves too
            return;
        }
        p.RelayedRxBytes += len;
        if (p.Relay == _via || nowMs - p.LastDirectRxMs < Tune.DirectQuietMs) return;
        Log.Info("path_relay", $"peer={p.Name} relay={_via.Name} reason={(p.Relay == null ? "direct_quiet" : "relay_moved")}");
        p.Relay = _via;
        p.PunchAttempts = 0;
        if (p.Up) p.PunchAtMs = nowMs + Tune.FirstPunchMs;
    }

    // The relayed record (inner datagram of innerLen bytes) sits at slot[RelayHeadroomLen..] of the
    // current UdpOut slot; seal the Forward record to the relay around it.
    private void WrapForRelay(Peer relay, Peer to, int innerLen, long nowMs)
    {
        Span<byte> slot = UdpOut.Slot(UdpOut.Count);
        slot[Record.PayloadOffset] = RelayForward;
        ((ReadOnlySpan<byte>)to.PublicKey).CopyTo(slot[(Record.PayloadOffset + 1)..]);
        Session s = relay.Current!;
        int len = Record.Seal(s, slot, 1 + Spec.KeyLen + innerLen, RecordFlags.Relay, Mtu);
        UdpOut.Alone[UdpOut.Count] = true;       // RelayHeadroomLen past the path MTU: no GSO run (the kernel refuses such segments)
        CommitOut(len);
        to.RelayedTxBytes += innerLen;
        AfterSend(relay, s, len, nowMs, carriesData: false);
    }

    // A Relay record from member p: a Forward we carry on, or a Delivered one for us. Returns the
    // length of the IP packet at payload[1 + innerOffset..], or 0.
    private int ReceiveRelay(Peer p, Span<byte> payload, long nowMs, out int innerOffset)
    {
        innerOffset = 0;
        if (_via == null && payload.Length == 1 + Spec.KeyLen && payload[0] == RelayRefused) { HelloRefused(p, payload[1..], nowMs); return 0; }
        if (_via != null || payload.Length < 1 + Spec.PreambleLen + 1) { RefuseRelay(p, "malformed", payload.Length); return 0; }
        if (payload[0] == RelayForward) { Forward(p, payload[1..], nowMs); return 0; }
        if (payload[0] != RelayDelivered) { RefuseRelay(p, "malformed", payload.Length); return 0; }
        Span<byte> inner = payload[1..];
        _via = p;
        try
        {
            switch (Record.Classify(inner))
            {
                case RecordKind.Transport: return ReceiveTransport(inner, p.Endpoint, nowMs, out innerOffset);
                case RecordKind.ClientHello: ReceiveClientHello(inner, p.Endpoint, nowMs); break;
                case RecordKind.ServerHello: ReceiveServerHello(inner, p.Endpoint, nowMs); break;
                default: RefuseRelay(p, "malformed", payload.Length); break;
            }
            return 0;
        }
        finally { _via = null; }
    }

    // This node as the relay: from's inner datagram goes on to the member it names, if that member
    // is up here and the pair is within its budget.
    private void Forward(Peer from, ReadOnlySpan<byte> m, long nowMs)
    {
        if (m.Length < Spec.KeyLen + Spec.PreambleLen + 1) { RefuseRelay(from, "malformed", m.Length); return; }
        Key32 key = default;
        m[..Spec.KeyLen].CopyTo(key);
        ReadOnlySpan<byte> inner = m[Spec.KeyLen..];
        Peer? to = FindPeer(key);
        string? why = !Relays.Offered ? "not_offered"
            : to == null || to == from ? "unknown_member"
            : from.Isolated || to.Isolated ? "isolated"
            : !from.Up || !Direct(to, nowMs) ? "member_not_up"
            : Record.Classify(inner) is not (RecordKind.Transport or RecordKind.ClientHello or RecordKind.ServerHello) ? "malformed"
            : RelayHeadroomLen + inner.Length + Spec.TagLen + Spec.PadBlockLen > UdpOut.SlotLen ? "too_long" : null;
        why ??= Relays.Admit(from, to!, inner.Length, nowMs);
        if (why == "rate") { Counters.Drop(DropReason.RelayRate); return; }
        if (why != null)
        {
            RefuseRelay(from, why, m.Length);
            if (Record.Classify(inner) == RecordKind.ClientHello) TellRefused(from, key, nowMs);
            return;
        }
        SendRelayRecord(to!, RelayDelivered, inner, alone: true, nowMs);
    }

    // A Relay record of ours, kind ‖ body, to member `to` straight to its endpoint. Alone: a
    // relayed inner datagram may be longer than the path MTU (no GSO run).
    private void SendRelayRecord(Peer to, byte kind, ReadOnlySpan<byte> body, bool alone, long nowMs)
    {
        Span<byte> slot = NextOut(to.Endpoint);
        slot[Record.PayloadOffset] = kind;
        body.CopyTo(slot[(Record.PayloadOffset + 1)..]);
        Session s = to.Current!;
        int len = Record.Seal(s, slot, 1 + body.Length, RecordFlags.Relay, Mtu);
        UdpOut.Alone[UdpOut.Count] = alone;
        CommitOut(len);
        AfterSend(to, s, len, nowMs, carriesData: false);
    }

    // A hello we did not carry would cost its sender a retransmit delay (1 s) before it tries the
    // direct path; a full table at a busy relay (a mesh forming) made that most pairs' first second.
    // One notice per refused hello, sealed to the member that sent it: nothing for anyone else.
    private void TellRefused(Peer from, in Key32 key, long nowMs)
    {
        if (!from.HearsRefusals || !Direct(from, nowMs)) return;
        SendRelayRecord(from, RelayRefused, key, alone: false, nowMs);
        Relays.RefusalsTold++;
    }

    // Our relay did not carry our hello to the member named: it goes straight to its endpoint now
    // (the same hello, §10). Only a hello in flight through that very relay, to a member not up,
    // is moved: a notice can make us do sooner only what the retransmit would do anyway.
    private void HelloRefused(Peer relay, ReadOnlySpan<byte> key, long nowMs)
    {
        Key32 k = default;
        key.CopyTo(k);
        Peer? q = FindPeer(k);
        if (q == null || q.Relay != relay || q.Pending == null || q.Up || !q.Endpoint.IsSet) return;
        Relays.RefusalsHeard++;
        q.HelloUnanswered = true;                        // ChoosePath takes the direct path
        (long retransmitAtMs, int attempts) = (q.RetransmitHandshakeAtMs, q.HandshakeAttempts);
        StartHandshake(q, nowMs, retransmit: true);
        (q.RetransmitHandshakeAtMs, q.HandshakeAttempts) = (retransmitAtMs, attempts);   // the same attempt, on the other path
    }

    // A member that went down, or a full table, is ordinary operation (the sender tries the other
    // path next): debug. The rest is a misconfigured or hostile member: warn.
    private void RefuseRelay(Peer from, string why, int len)
    {
        Relays.Refused++;
        Counters.Drop(DropReason.RelayRefused);
        LogLevel level = why is "member_not_up" or "pairs_full" ? LogLevel.Debug : LogLevel.Warn;
        if (Log.Wants(level, "relay_refused")) Log.Emit(level, "relay_refused", $"peer={from.Name} reason={why} len={len}");
    }

    /// <summary>One punch round for a relayed peer: a priming datagram (a keepalive of our session
    /// that dies after PunchPrimeTtl hops, past our own NAT, before the other's) to each endpoint of
    /// p, so our NAT expects p's answer; then a Punch message through the relay, which p answers with
    /// full datagrams to our endpoints. Whichever arrives moves both sides to the direct path.</summary>
    internal void Punch(Peer p, long nowMs)
    {
        if (p.Relay == null || !CanSend(p, nowMs)) return;
        _punchTo.Clear();
        foreach (Endpoint e in p.Announced) AddEndpoint(_punchTo, e);
        foreach (Endpoint e in p.Candidates) AddEndpoint(_punchTo, e);
        foreach (Endpoint e in _punchTo) SendProbe(p, e, Tune.PunchPrimeTtl, nowMs);
        Mesh.SendPunch(p, nowMs);
        p.PunchesSent++;
        p.PunchAtMs = nowMs + p.PunchDelayMs(p.PunchAttempts++);
        Log.Debug("punch_sent", $"peer={p.Name} endpoints={_punchTo.Count} round={p.PunchAttempts}");
    }

    private readonly List<Endpoint> _punchTo = new();

    private static void AddEndpoint(List<Endpoint> list, in Endpoint e)
    {
        if (e.IsSet && list.Count < 2 * Tune.MaxEndpointsPerMember && !list.Contains(e)) list.Add(e);
    }

    // `veil ping`: echo requests waiting for their Pong, at most MaxPings (the oldest gives way).
    private const int MaxPings = 16;
    private readonly List<(ulong Id, Peer To, long SentTicks, Action<string> Answer)> _pings = new();
    private ulong _nextPingId = (ulong)Random.Shared.NextInt64();

    /// <summary>Sends p a Ping; answer hears "pong from …" when its Pong arrives. An error line
    /// (no session) comes back at once; a lost Ping is never answered (the client times out).</summary>
    internal void Ping(Peer p, long nowMs, Action<string> answer)
    {
        if (!CanSend(p, nowMs)) { answer($"error: {p.Name} has no session now (state {p.State.ToString().ToLowerInvariant()}); see 'veil status'\n"); return; }
        ulong id = _nextPingId++;
        if (!Mesh.SendPing(p, id, nowMs)) { answer($"error: could not send to {p.Name}\n"); return; }
        if (_pings.Count == MaxPings) _pings.RemoveAt(0);
        _pings.Add((id, p, Stopwatch.GetTimestamp(), answer));
    }

    internal void Ponged(Peer p, ulong id)
    {
        int i = _pings.FindIndex(x => x.Id == id && x.To == p);
        if (i < 0) return;                                       // not ours, or given up on
        var (_, _, sent, answer) = _pings[i];
        _pings.RemoveAt(i);
        double ms = Stopwatch.GetElapsedTime(sent).TotalMilliseconds;
        string path = _via != null ? "relay:" + _via.Name : "direct";
        Endpoint at = _via != null ? _via.Endpoint : p.Endpoint;
        answer(string.Create(System.Globalization.CultureInfo.InvariantCulture, $"pong from {p.Name} path={path} endpoint={at} time={ms:F2} ms\n"));
    }

    /// <summary>A keepalive of p's session straight to `to` (ttl 0: the socket's).</summary>
    internal void SendProbe(Peer p, in Endpoint to, int ttl, long nowMs)
    {
        Session s = p.Current!;
        Span<byte> slot = NextOut(to);
        int len = Record.Seal(s, slot, 0, RecordFlags.Keepalive, Mtu);
        UdpOut.Ttl[UdpOut.Count] = (byte)ttl;
        CommitOut(len);
        AfterSend(p, s, len, nowMs, carriesData: false);
    }
}

/// <summary>--port-mapping (the default): asks the gateway of the default route to forward our UDP
/// port, with PCP (RFC 6887), NAT-PMP (RFC 6886) or UPnP IGD, whichever answers first, so members
/// outside reach this node without punching. It runs on a thread of its own (each try waits on the
/// network), renews at half the lifetime, deletes the mapping on exit, and hands the mapped public
/// endpoint to the loop (onMapped), which announces it to members. Only the gateway is ever asked,
/// and a UPnP description or control URL that names another host is refused.</summary>
internal sealed class PortMapper : IDisposable
{
    // --exit-node: the gateway is asked on the uplink, never through the exit.
    private static Socket Marked(Socket s)
    {
        if (UdpSocket.FwMark != 0) s.SetSocketOption(SocketOptionLevel.Socket, (SocketOptionName)Libc.SO_MARK, (int)UdpSocket.FwMark);
        return s;
    }

    internal const int PcpPort = 5351, SsdpPort = 1900;    // NAT-PMP and PCP share 5351
    private const uint RequestLifetimeS = 7200;             // RFC 6886 §3.3's recommendation; PCP the same
    private const uint UpnpLeaseS = 3600;
    private const int FirstRetryMs = 30_000, MaxRetryMs = 600_000;
    private const int AnswerWaitMs = 500, HttpTimeoutMs = 2000, MaxHttpLen = 64 * 1024;

    /// <summary>What the gateway last said: the protocol that mapped (empty: none), the mapped
    /// endpoint, its lifetime, or why nothing is mapped.</summary>
    internal sealed record State(string Protocol, IPAddress? Gateway, Endpoint External, long LifetimeS, string? Error, string Tried);

    internal volatile State Current = new("", null, default, 0, "starting", "");
    private readonly int _port;
    private readonly Action<Endpoint> _onMapped;
    private readonly Log _log;
    private readonly string[] _order;
    private readonly AutoResetEvent _kick = new(false);
    private readonly Thread _thread;
    private volatile bool _stop;
    private readonly byte[] _nonce = RandomNumberGenerator.GetBytes(12);   // PCP: ours, for every request of this run
    private HttpUrl? _upnpControl; private string? _upnpService;                           // found by the last UPnP try

    /// <summary>order: the protocols to try ("pcp", "nat-pmp", "upnp"); VEIL_PORTMAP can narrow it.</summary>
    internal PortMapper(int port, Action<Endpoint> onMapped, Log log, string[] order)
    {
        _port = port;
        _onMapped = onMapped;
        _log = log;
        _order = order;
        _thread = new Thread(Run) { IsBackground = true, Name = "veil-portmap" };
        _thread.Start();
    }

    internal static string[] Protocols(string? env) =>
        env is { Length: > 0 } ? env.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries) : ["pcp", "nat-pmp", "upnp"];

    private void Run()
    {
        int retryMs = FirstRetryMs;
        while (!_stop)
        {
            int waitMs;
            State s = Map();
            bool changed = s.Protocol != Current.Protocol || !s.External.Equals(Current.External) || s.Error != Current.Error;
            Current = s;
            if (s.Error == null)
            {
                if (changed) _log.Info("port_mapped", $"protocol={s.Protocol} gateway={s.Gateway} external={s.External} lifetime_s={s.LifetimeS}");
                _onMapped(s.External);
                retryMs = FirstRetryMs;
                waitMs = (int)Math.Clamp(s.LifetimeS * 1000 / 2, FirstRetryMs, 3_600_000);   // 0 (UPnP, permanent): 30 s..1 h
                if (s.LifetimeS == 0) waitMs = 1_800_000;
            }
            else
            {
                if (changed) _log.Info("port_mapping_failed", $"gateway={s.Gateway?.ToString() ?? "none"} tried={s.Tried} error=\"{s.Error}\" next_in_s={retryMs / 1000}");
                waitMs = retryMs;
                retryMs = Math.Min(retryMs * 2, MaxRetryMs);
            }
            _kick.WaitOne(waitMs);
        }
    }

    // One round: the protocol that worked last first, then the others in order.
    private State Map()
    {
        IPAddress? gw = DefaultGateway(File.Exists("/proc/net/route") ? File.ReadAllText("/proc/net/route") : "");
        if (gw == null) return new("", null, default, 0, "no default IPv4 gateway", "");
        var tried = new StringBuilder();
        string last = Current.Protocol, error = "";
        foreach (string proto in last.Length > 0 ? [last, .. _order] : _order)
        {
            if (_stop || tried.ToString().Contains(proto)) continue;
            tried.Append(tried.Length > 0 ? "," : "").Append(proto);
            try
            {
                (Endpoint ext, long lifetime) = proto switch
                {
                    "pcp" => MapPcp(gw, RequestLifetimeS),
                    "nat-pmp" => MapNatPmp(gw, RequestLifetimeS),
                    "upnp" => MapUpnp(gw, UpnpLeaseS),
                    _ => throw new IOException("unknown protocol"),
                };
                return new(proto, gw, ext, lifetime, null, tried.ToString());
            }
            catch (Exception e) when (e is IOException or SocketException or FormatException)
            {
                error += (error.Length > 0 ? "; " : "") + proto + ": " + e.Message;
            }
        }
        return new("", gw, default, 0, error, tried.ToString());
    }

    /// <summary>The gateway of the default IPv4 route with the lowest metric, from /proc/net/route.</summary>
    internal static IPAddress? DefaultGateway(string routes)
    {
        IPAddress? best = null;
        long bestMetric = long.MaxValue;
        foreach (string line in routes.Split('\n'))
        {
            string[] f = line.Split('\t', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
            if (f.Length < 7 || f[1] != "00000000" || !uint.TryParse(f[2], System.Globalization.NumberStyles.HexNumber, null, out uint g) || g == 0
                || !int.TryParse(f[3], System.Globalization.NumberStyles.HexNumber, null, out int flags) || (flags & 3) != 3
                || !long.TryParse(f[6], out long metric) || metric >= bestMetric) continue;
            best = new IPAddress(g);                     // the file holds it in host (little-endian) order, as IPAddress(long) takes it
            bestMetric = metric;
        }
        return best;
    }

    // ---- PCP and NAT-PMP: one UDP request, an answer from the gateway's port 5351 ----

    // Sends req to gw:5351 up to twice (500 ms, then 1 s) and returns the first answer accepted by ok.
    private static int Ask(IPAddress gw, ReadOnlySpan<byte> req, Span<byte> answer, Func<byte[], int, bool> ok, out IPAddress local)
    {
        using var sock = new Socket(AddressFamily.InterNetwork, SocketType.Dgram, ProtocolType.Udp);
        Marked(sock);
        sock.Connect(new IPEndPoint(gw, PcpPort));       // connected: only the gateway's port answers
        local = ((IPEndPoint)sock.LocalEndPoint!).Address;
        byte[] buf = new byte[1100];
        for (int attempt = 0, waitMs = AnswerWaitMs; attempt < 2; attempt++, waitMs *= 2)
        {
            sock.Send(req);
            long until = Mono.NowMs() + waitMs;
            while (Mono.NowMs() < until && sock.Poll((int)(until - Mono.NowMs()) * 1000, SelectMode.SelectRead))
            {
                int n = sock.Receive(buf);                 // ICMP port unreachable throws: no server there
                if (!ok(buf, n)) continue;
                buf.AsSpan(0, Math.Min(n, answer.Length)).CopyTo(answer);
                return n;
            }
        }
        throw new IOException("no answer");
    }

    private (Endpoint, long) MapNatPmp(IPAddress gw, uint lifetimeS)
    {
        Span<byte> req = stackalloc byte[12], ans = stackalloc byte[16];
        Ask(gw, [0, 0], ans, (b, n) => n >= 12 && b[0] == 0 && b[1] == 128, out _);
        if (!NatPmp.TryParseAddress(ans[..12], out IPAddress? ext, out int result)) throw new IOException("malformed address answer");
        if (result != 0) throw new IOException($"address refused: result {result}");
        NatPmp.WriteMap(req, (ushort)_port, (ushort)_port, lifetimeS);
        Ask(gw, req, ans, (b, n) => n >= 16 && b[0] == 0 && b[1] == 129 && BinaryPrimitives.ReadUInt16BigEndian(b.AsSpan(8)) == _port, out _);
        if (!NatPmp.TryParseMap(ans, out ushort extPort, out uint lifetime, out result)) throw new IOException("malformed map answer");
        if (result != 0) throw new IOException($"mapping refused: result {result} ({NatPmp.ResultName(result)})");
        return (Endpoint.FromIp(ext!, extPort), lifetime);
    }

    private (Endpoint, long) MapPcp(IPAddress gw, uint lifetimeS)
    {
        Span<byte> req = stackalloc byte[Pcp.MapLen], ans = stackalloc byte[Pcp.MapLen];
        IPAddress local;
        using (var probe = Marked(new Socket(AddressFamily.InterNetwork, SocketType.Dgram, ProtocolType.Udp)))
        {
            probe.Connect(new IPEndPoint(gw, PcpPort));
            local = ((IPEndPoint)probe.LocalEndPoint!).Address;
        }
        Pcp.WriteMap(req, local, _nonce, (ushort)_port, (ushort)_port, lifetimeS);
        byte[] nonce = _nonce;
        int n = Ask(gw, req, ans, (b, len) => len >= 4 && (b[0] == 2 && b[1] == (0x80 | Pcp.OpMap) || b[0] == 0), out _);
        if (ans[0] == 0) throw new IOException("the gateway speaks NAT-PMP only");
        if (!Pcp.TryParseMap(ans[..Math.Min(n, Pcp.MapLen)], nonce, out Endpoint ext, out uint lifetime, out int result))
            throw new IOException("malformed MAP answer");
        if (result != 0) throw new IOException($"MAP refused: result {result} ({Pcp.ResultName(result)})");
        return (ext, lifetime);
    }

    // ---- UPnP IGD: SSDP discovery, the description, SOAP to the WAN connection service ----

    private (Endpoint, long) MapUpnp(IPAddress gw, uint leaseS)
    {
        if (_upnpControl == null)
        {
            string location = Discover(gw);
            HttpUrl root = Upnp.GatewayUrl(location, gw) ?? throw new IOException($"description at {location} is not on the gateway");
            (int status, string xml) = Http(gw, root, "GET", null, null);
            if (status != 200) throw new IOException($"description: HTTP {status}");
            (string service, string control) = Upnp.FindWanService(xml) ?? throw new IOException("no WANIPConnection or WANPPPConnection service");
            HttpUrl url = Upnp.GatewayUrl(root.Resolve(control), gw) ?? throw new IOException($"control URL {control} is not on the gateway");
            (_upnpService, _upnpControl) = (service, url);
        }
        HttpUrl ctl = _upnpControl.Value;
        string svc = _upnpService!;
        IPAddress local;
        using (var probe = Marked(new Socket(AddressFamily.InterNetwork, SocketType.Dgram, ProtocolType.Udp)))
        {
            probe.Connect(new IPEndPoint(gw, SsdpPort));
            local = ((IPEndPoint)probe.LocalEndPoint!).Address;
        }
        var args = new List<(string, string)>
        {
            ("NewRemoteHost", ""), ("NewExternalPort", _port.ToString()), ("NewProtocol", "UDP"), ("NewInternalPort", _port.ToString()),
            ("NewInternalClient", local.ToString()), ("NewEnabled", "1"), ("NewPortMappingDescription", "veil"), ("NewLeaseDuration", leaseS.ToString()),
        };
        (int st, string body) = Soap(gw, ctl, svc, "AddPortMapping", args);
        if (st != 200 && Upnp.SoapValue(body, "errorCode") == "725")          // OnlyPermanentLeasesSupported (IGD v1)
        {
            args[^1] = ("NewLeaseDuration", "0");
            leaseS = 0;
            (st, body) = Soap(gw, ctl, svc, "AddPortMapping", args);
        }
        if (st != 200) { _upnpControl = null; throw new IOException($"AddPortMapping: HTTP {st} error {Upnp.SoapValue(body, "errorCode") ?? "?"} {Upnp.SoapValue(body, "errorDescription")}"); }
        (st, body) = Soap(gw, ctl, svc, "GetExternalIPAddress", []);
        if (st != 200 || !IPAddress.TryParse(Upnp.SoapValue(body, "NewExternalIPAddress") ?? "", out IPAddress? ext) || ext.AddressFamily != AddressFamily.InterNetwork)
            throw new IOException($"GetExternalIPAddress: HTTP {st}");
        return (Endpoint.FromIp(ext, _port), leaseS);
    }

    // M-SEARCH to the gateway (unicast and on the SSDP group); the LOCATION of its first answer.
    private static string Discover(IPAddress gw)
    {
        using var sock = new Socket(AddressFamily.InterNetwork, SocketType.Dgram, ProtocolType.Udp);
        Marked(sock);
        sock.Bind(new IPEndPoint(IPAddress.Any, 0));
        byte[] search = Encoding.ASCII.GetBytes(Upnp.MSearch);
        sock.SendTo(search, new IPEndPoint(gw, SsdpPort));
        try { sock.SendTo(search, new IPEndPoint(IPAddress.Parse("239.255.255.250"), SsdpPort)); }
        catch (SocketException) { }                          // no multicast route: the unicast one may do
        byte[] buf = new byte[2048];
        long until = Mono.NowMs() + 1500;
        while (Mono.NowMs() < until && sock.Poll((int)(until - Mono.NowMs()) * 1000, SelectMode.SelectRead))
        {
            EndPoint from = new IPEndPoint(IPAddress.Any, 0);
            int n = sock.ReceiveFrom(buf, ref from);
            if (!((IPEndPoint)from).Address.Equals(gw)) continue;           // only the gateway is believed
            if (Upnp.Location(Encoding.ASCII.GetString(buf, 0, n)) is string loc) return loc;
        }
        throw new IOException("no SSDP answer from the gateway");
    }

    private static (int, string) Soap(IPAddress gw, HttpUrl ctl, string service, string action, List<(string Name, string Value)> args) =>
        Http(gw, ctl, "POST", Upnp.SoapBody(service, action, args), $"\"{service}#{action}\"");

    // One HTTP/1.0 exchange with the gateway (no keep-alive, no chunking), bounded in time and size.
    private static (int Status, string Body) Http(IPAddress gw, HttpUrl url, string method, string? body, string? soapAction)
    {
        using var sock = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { ReceiveTimeout = HttpTimeoutMs, SendTimeout = HttpTimeoutMs };
        Marked(sock);
        IAsyncResult ar = sock.BeginConnect(new IPEndPoint(gw, url.Port), null, null);
        if (!ar.AsyncWaitHandle.WaitOne(HttpTimeoutMs)) throw new IOException($"connect {gw}:{url.Port} timed out");
        sock.EndConnect(ar);
        byte[] content = Encoding.UTF8.GetBytes(body ?? "");
        var head = new StringBuilder($"{method} {url.Path} HTTP/1.0\r\nHost: {url.Host}:{url.Port}\r\n");
        if (soapAction != null) head.Append($"Content-Type: text/xml; charset=\"utf-8\"\r\nSOAPAction: {soapAction}\r\n");
        if (body != null) head.Append($"Content-Length: {content.Length}\r\n");
        head.Append("Connection: close\r\n\r\n");
        sock.Send([.. Encoding.ASCII.GetBytes(head.ToString()), .. content]);
        var got = new MemoryStream();
        byte[] buf = new byte[4096];
        long until = Mono.NowMs() + HttpTimeoutMs;
        for (int n; Mono.NowMs() < until && (n = sock.Receive(buf)) > 0;)
        {
            got.Write(buf, 0, n);
            if (got.Length > MaxHttpLen) throw new IOException("answer too long");
        }
        return Upnp.ParseHttp(Encoding.UTF8.GetString(got.ToArray())) ?? throw new IOException("malformed HTTP answer");
    }

    // ---- exit: the mapping goes with us ----

    /// <summary>Stops the thread and deletes the mapping (bounded: one try per protocol).</summary>
    public void Dispose()
    {
        _stop = true;
        _kick.Set();
        _thread.Join((int)Tune.ShutdownGraceMs);
        State s = Current;
        if (s.Error != null || s.Gateway == null) return;
        try
        {
            switch (s.Protocol)
            {
                case "pcp": MapPcp(s.Gateway, 0); break;
                case "nat-pmp":
                    Span<byte> req = stackalloc byte[12], ans = stackalloc byte[16];
                    NatPmp.WriteMap(req, (ushort)_port, 0, 0);
                    Ask(s.Gateway, req, ans, (b, n) => n >= 16 && b[1] == 129, out _);
                    break;
                case "upnp" when _upnpControl != null:
                    Soap(s.Gateway, _upnpControl.Value, _upnpService!, "DeletePortMapping",
                        [("NewRemoteHost", ""), ("NewExternalPort", s.External.Port.ToString()), ("NewProtocol", "UDP")]);
                    break;
            }
            _log.Info("port_unmapped", $"protocol={s.Protocol} external={s.External}");
        }
        catch (Exception e) when (e is IOException or SocketException)
        {
            _log.Warn("port_unmap_failed", $"protocol={s.Protocol} error=\"{e.Message}\" hint=\"the gateway drops it when its lifetime ends\"");
        }
    }
}

/// <summary>NAT-PMP (RFC 6886) messages: version 0; integers big-endian.</summary>
internal static class NatPmp
{
    /// <summary>Map UDP: 0 ‖ 1 ‖ reserved 2 ‖ internal port ‖ suggested external port ‖ lifetime s (0: delete).</summary>
    internal static void WriteMap(Span<byte> d, ushort internalPort, ushort externalPort, uint lifetimeS)
    {
        d[..12].Clear();
        d[1] = 1;
        BinaryPrimitives.WriteUInt16BigEndian(d[4..], internalPort);
        BinaryPrimitives.WriteUInt16BigEndian(d[6..], externalPort);
        BinaryPrimitives.WriteUInt32BigEndian(d[8..], lifetimeS);
    }

    /// <summary>0 ‖ 128 ‖ result ‖ epoch s ‖ external IPv4.</summary>
    internal static bool TryParseAddress(ReadOnlySpan<byte> a, out IPAddress? external, out int result)
    {
        external = null;
        result = a.Length >= 4 ? BinaryPrimitives.ReadUInt16BigEndian(a[2..]) : -1;
        if (a.Length != 12 || a[0] != 0 || a[1] != 128) return false;
        external = new IPAddress(a[8..12]);
        return true;
    }

    /// <summary>0 ‖ 129 ‖ result ‖ epoch s ‖ internal port ‖ mapped external port ‖ lifetime s.</summary>
    internal static bool TryParseMap(ReadOnlySpan<byte> a, out ushort externalPort, out uint lifetimeS, out int result)
    {
        externalPort = 0;
        lifetimeS = 0;
        result = a.Length >= 4 ? BinaryPrimitives.ReadUInt16BigEndian(a[2..]) : -1;
        if (a.Length != 16 || a[0] != 0 || a[1] != 129) return false;
        externalPort = BinaryPrimitives.ReadUInt16BigEndian(a[10..]);
        lifetimeS = BinaryPrimitives.ReadUInt32BigEndian(a[12..]);
        return result != 0 || externalPort != 0;
    }

    internal static string ResultName(int r) => r switch
    {
        1 => "unsupported version", 2 => "not authorized", 3 => "network failure", 4 => "out of resources", 5 => "unsupported opcode", _ => "unknown",
    };
}

/// <summary>PCP (RFC 6887) MAP messages: a 24-byte header and the 36-byte MAP body; integers
/// big-endian, addresses as 16 bytes (IPv4 mapped into IPv6).</summary>
internal static class Pcp
{
    internal const int MapLen = 60;
    internal const byte OpMap = 1;

    /// <summary>2 ‖ MAP ‖ reserved 2 ‖ lifetime ‖ client address 16 ‖ nonce 12 ‖ UDP (17) ‖ reserved 3 ‖
    /// internal port ‖ suggested external port ‖ suggested external address 16 (all zero: any).</summary>
    internal static void WriteMap(Span<byte> d, IPAddress client, ReadOnlySpan<byte> nonce, ushort internalPort, ushort externalPort, uint lifetimeS)
    {
        d[..MapLen].Clear();
        d[0] = 2;
        d[1] = OpMap;
        BinaryPrimitives.WriteUInt32BigEndian(d[4..], lifetimeS);
        client.MapToIPv6().TryWriteBytes(d[8..24], out _);
        nonce[..12].CopyTo(d[24..]);
        d[36] = 17;
        BinaryPrimitives.WriteUInt16BigEndian(d[40..], internalPort);
        BinaryPrimitives.WriteUInt16BigEndian(d[42..], externalPort);
        d[54] = d[55] = 0xff;                           // ::ffff:0.0.0.0, "any IPv4 address"
    }

    /// <summary>2 ‖ 0x80|MAP ‖ reserved ‖ result ‖ lifetime ‖ epoch ‖ reserved 12 ‖ nonce 12 ‖ protocol ‖
    /// reserved 3 ‖ internal port ‖ assigned external port ‖ assigned external address 16. A nonce
    /// other than ours is not an answer to us (false).</summary>
    internal static bool TryParseMap(ReadOnlySpan<byte> a, ReadOnlySpan<byte> nonce, out Endpoint external, out uint lifetimeS, out int result)
    {
        external = default;
        lifetimeS = 0;
        result = a.Length >= 4 ? a[3] : -1;
        if (a.Length != MapLen || a[0] != 2 || a[1] != (0x80 | OpMap) || !a[24..36].SequenceEqual(nonce[..12]) || a[36] != 17) return false;
        lifetimeS = BinaryPrimitives.ReadUInt32BigEndian(a[4..]);
        if (result != 0) return true;
        var ip = new IPAddress(a[44..60]);
        if (!ip.IsIPv4MappedToIPv6) return false;          // a v4 mapping must come back as v4
        external = Endpoint.FromIp(ip.MapToIPv4(), BinaryPrimitives.ReadUInt16BigEndian(a[42..]));
        return external.Port != 0;
    }

    internal static string ResultName(int r) => r switch
    {
        1 => "unsupported version", 2 => "not authorized", 3 => "malformed request", 4 => "unsupported opcode", 5 => "unsupported option",
        6 => "malformed option", 7 => "network failure", 8 => "no resources", 9 => "unsupported protocol", 10 => "user exceeded quota",
        11 => "cannot provide external", 12 => "address mismatch", 13 => "excessive remote peers", _ => "unknown",
    };
}

/// <summary>The text of UPnP IGD: SSDP search, the description's WAN service, SOAP requests and
/// answers. Found by plain string search: a description is small, and no XML reader is needed.</summary>
/// <summary>An http URL on a gateway in the only form UPnP needs: an IPv4 host, a port and a path.
/// Its own parser rather than System.Uri (about 60 KB of a router's flash), and a strict one: a
/// path the request line could not carry verbatim (spaces, CR, LF, non-ASCII) is refused.</summary>
internal readonly record struct HttpUrl(string Host, int Port, string Path)
{
    public override string ToString() => $"http://{Host}:{Port}{Path}";

    public static bool TryParse(string text, out HttpUrl url)
    {
        url = default;
        if (!text.StartsWith("http://", StringComparison.OrdinalIgnoreCase)) return false;
        string rest = text[7..];
        int cut = rest.IndexOfAny(['/', '?', '#']);
        string authority = cut < 0 ? rest : rest[..cut], path = cut < 0 ? "/" : rest[cut..];
        if (path.IndexOf('#') is int hash and >= 0) path = path[..hash];
        if (!path.StartsWith('/')) path = "/" + path;
        int port = 80, colon = authority.LastIndexOf(':');
        if (colon >= 0 && (authority.Length - colon > 6 || !int.TryParse(authority.AsSpan(colon + 1), System.Globalization.NumberStyles.None, null, out port) || port is < 1 or > 65535))
            return false;
        string host = colon >= 0 ? authority[..colon] : authority;
        // The round trip refuses the shorthand forms ("10.1", "0x7f.1") IPAddress.TryParse also takes.
        if (!IPAddress.TryParse(host, out IPAddress? ip) || ip.AddressFamily != AddressFamily.InterNetwork || ip.ToString() != host) return false;
        foreach (char c in path) if (c is <= ' ' or > '~') return false;
        url = new HttpUrl(host, port, path);
        return true;
    }

    /// <summary>A reference from a description (an absolute URL, an absolute path, or a path relative
    /// to this URL's directory) as an absolute URL, still to be checked by TryParse.</summary>
    public string Resolve(string reference)
    {
        reference = reference.Trim();
        if (reference.Contains("://")) return reference;
        if (reference.StartsWith('/')) return $"http://{Host}:{Port}{reference}";
        string path = Path.IndexOf('?') is int q and >= 0 ? Path[..q] : Path;
        return $"http://{Host}:{Port}{path[..(path.LastIndexOf('/') + 1)]}{reference}";
    }
}

internal static class Upnp
{
    internal const string MSearch = "M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\n" +
                                    "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n";
    private static readonly string[] WanServices =
    [
        "urn:schemas-upnp-org:service:WANIPConnection:2", "urn:schemas-upnp-org:service:WANIPConnection:1", "urn:schemas-upnp-org:service:WANPPPConnection:1",
    ];

    /// <summary>The LOCATION header of an SSDP answer (200 OK), or null.</summary>
    internal static string? Location(string answer)
    {
        string[] lines = answer.Split("\r\n");
        if (lines.Length == 0 || !lines[0].StartsWith("HTTP/1.1 200", StringComparison.Ordinal)) return null;
        foreach (string line in lines)
            if (line.StartsWith("LOCATION:", StringComparison.OrdinalIgnoreCase)) return line[9..].Trim();
        return null;
    }

    /// <summary>url as an http URL on the gateway itself; null for anything else.</summary>
    internal static HttpUrl? GatewayUrl(string url, IPAddress gw) =>
        HttpUrl.TryParse(url, out HttpUrl u) && IPAddress.TryParse(u.Host, out IPAddress? h) && h.Equals(gw) ? u : null;

    /// <summary>The first WAN connection service of a description: its type and control URL.</summary>
    internal static (string Service, string Control)? FindWanService(string xml)
    {
        foreach (string type in WanServices)
        {
            int at = xml.IndexOf("<serviceType>" + type + "</serviceType>", StringComparison.Ordinal);
            if (at < 0) continue;
            int end = xml.IndexOf("</service>", at, StringComparison.Ordinal);
            string service = end < 0 ? xml[at..] : xml[at..end];
            if (Element(service, "controlURL") is string control) return (type, control);
        }
        return null;
    }

    /// <summary>The text of the first &lt;name&gt; element (any namespace prefix), or null.</summary>
    internal static string? SoapValue(string body, string name) => Element(body, name);

    private static string? Element(string xml, string name)
    {
        for (int at = 0; (at = xml.IndexOf(name, at, StringComparison.Ordinal)) > 0; at += name.Length)
        {
            if (xml[at - 1] is not ('<' or ':') || at + name.Length >= xml.Length || xml[at + name.Length] != '>') continue;
            int start = at + name.Length + 1, stop = xml.IndexOf('<', start);
            return stop < 0 ? null : System.Net.WebUtility.HtmlDecode(xml[start..stop].Trim());
        }
        return null;
    }

    internal static string SoapBody(string service, string action, List<(string Name, string Value)> args)
    {
        var b = new StringBuilder("<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" " +
                                  "s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>");
        b.Append("<u:").Append(action).Append(" xmlns:u=\"").Append(service).Append("\">");
        foreach (var (n, v) in args) b.Append('<').Append(n).Append('>').Append(System.Net.WebUtility.HtmlEncode(v)).Append("</").Append(n).Append('>');
        return b.Append("</u:").Append(action).Append("></s:Body></s:Envelope>\r\n").ToString();
    }

    /// <summary>Status code and body of an HTTP answer, or null when it is not one.</summary>
    internal static (int, string)? ParseHttp(string answer)
    {
        int headEnd = answer.IndexOf("\r\n\r\n", StringComparison.Ordinal);
        if (!answer.StartsWith("HTTP/1.", StringComparison.Ordinal) || headEnd < 0) return null;
        string[] status = answer[..answer.IndexOf("\r\n", StringComparison.Ordinal)].Split(' ');
        return status.Length >= 2 && int.TryParse(status[1], out int code) ? (code, answer[(headEnd + 4)..]) : null;
    }
}

/// <summary>Beacons (--beacon-store, --beacon-load): this node's reachable endpoints, sealed with the
/// network secret, left where other members can read them (a file on a shared folder or a web
/// server, a DNS TXT record through a command), so a member that lost every peer finds the mesh
/// again. A beacon is one line, "veil-beacon1 BASE64" of nonce (12) ‖ ChaCha20-Poly1305 of (public
/// key ‖ Unix seconds u64 ‖ n (1..8) ‖ n × endpoint, as in the exchange) under a key derived from
/// the secret. One that does not open under a secret we hold, is older than MaxAgeS, comes from the
/// future, or does not parse is ignored and counted; it can only name endpoints to try, never
/// make anything a member (the handshake still needs the secret).</summary>
internal static class Beacon
{
    internal const string Prefix = "veil-beacon1 ";
    internal const long MaxAgeS = 86_400, MaxSkewS = 300;
    internal const int MaxInputLen = 64 * 1024;            // what a beacon file or program may hand us
    private const int MaxLen = 1 + 32 + 8 + 1 + 8 * 19;

    /// <summary>The beacon key of a network secret (derived once at start: the secret itself is
    /// wiped from the daemon's memory then).</summary>
    internal static byte[] KeyOf(in Key32 psk)
    {
        byte[] key = new byte[32];
        Hkdf.Derive(key, psk, "veil beacon"u8, "v1"u8);
        return key;
    }

    internal static string Seal(byte[] key, in Key32 publicKey, long unixS, List<Endpoint> endpoints)
    {
        int n = Math.Min(endpoints.Count, Tune.MaxEndpointsPerMember);
        byte[] plain = new byte[32 + 8 + 1 + n * 19];
        ((ReadOnlySpan<byte>)publicKey).CopyTo(plain);
        BinaryPrimitives.WriteInt64BigEndian(plain.AsSpan(32), unixS);
        plain[40] = (byte)n;
        int pos = 41;
        for (int i = 0; i < n; i++) pos += ExchangeMessage.WriteEndpoint(plain.AsSpan(pos), endpoints[i]);
        byte[] sealedBeacon = new byte[12 + pos + Aead.TagLen];
        RandomNumberGenerator.Fill(sealedBeacon.AsSpan(0, 12));
        using (var aead = new Aead(AeadKind.ChaCha20Poly1305, key)) aead.Seal(sealedBeacon.AsSpan(0, 12), plain.AsSpan(0, pos), "veil-beacon1"u8, sealedBeacon.AsSpan(12));
        return Prefix + Convert.ToBase64String(sealedBeacon);
    }

    /// <summary>Opens one line under any of keys (KeyOf); null when it is a good beacon, else why not.</summary>
    internal static string? TryOpen(string line, IReadOnlyList<byte[]> keys, long nowUnixS, out Key32 publicKey, List<Endpoint> endpoints)
    {
        publicKey = default;
        endpoints.Clear();
        line = line.Trim();
        if (!line.StartsWith(Prefix, StringComparison.Ordinal)) return "not a beacon";
        byte[] raw = new byte[(line.Length - Prefix.Length) * 3 / 4 + 3];
        if (!Convert.TryFromBase64String(line[Prefix.Length..], raw, out int len) || len < 12 + 41 + Aead.TagLen || len > 12 + MaxLen + Aead.TagLen) return "malformed";
        byte[] plain = new byte[len - 12 - Aead.TagLen];
        bool opened = false;
        foreach (byte[] key in keys)
        {
            using (var aead = new Aead(AeadKind.ChaCha20Poly1305, key)) opened = aead.Open(raw.AsSpan(0, 12), raw.AsSpan(12, len - 12), "veil-beacon1"u8, plain);
            if (opened) break;
        }
        if (!opened) return "does not open under the network secret";
        long unixS = BinaryPrimitives.ReadInt64BigEndian(plain.AsSpan(32));
        if (unixS > nowUnixS + MaxSkewS) return "from the future";
        if (nowUnixS - unixS > MaxAgeS) return "stale";
        int n = plain[40], pos = 41;
        if (n is 0 or > Tune.MaxEndpointsPerMember) return "malformed";
        for (int i = 0; i < n; i++)
        {
            if (!ExchangeMessage.ReadEndpoint(plain, ref pos, out Endpoint e, allowUnset: false)) { endpoints.Clear(); return "malformed"; }
            endpoints.Add(e);
        }
        if (pos != plain.Length) { endpoints.Clear(); return "malformed"; }
        publicKey = new Key32();
        plain.AsSpan(0, 32).CopyTo(publicKey);
        return null;
    }

    /// <summary>Runs "|PROGRAM ARG..." (no shell) with input on its stdin; its stdout, bounded, or null
    /// (and why) when it cannot start, fails, or outlives timeoutMs (it is killed).</summary>
    internal static string? Run(string command, string? input, int timeoutMs, out string? error)
    {
        error = null;
        string[] argv = command.TrimStart('|').Split(' ', StringSplitOptions.RemoveEmptyEntries);
        if (argv.Length == 0) { error = "empty command"; return null; }
        try
        {
            Spawn.Exit p = Spawn.Run(argv, Spawn.Environment([]), input, withStderr: false, MaxInputLen, timeoutMs);
            if (p.TimedOut) { error = $"timed out after {timeoutMs} ms"; return null; }
            if (p.Code != 0) { error = $"exit status {p.Code}"; return null; }
            return p.Output;
        }
        catch (IOException e)
        {
            error = e.Message;
            return null;
        }
    }
}

/// <summary>The daemon's side of beacons (--beacon-store, --beacon-load; Beacon has the format) and
/// of port mapping: the mapped endpoint goes to the node, which tells members.</summary>
internal sealed unsafe partial class Daemon
{
    private readonly List<byte[]> _beaconKeys = new();
    private long _nextBeaconMs = Mono.NowMs();            // loading at once; storing once members told us how they see us
    private const long FirstBeaconStoreMs = 5_000;
    private const long BeaconIntervalMs = 600_000;
    internal const int BeaconCommandTimeoutMs = 10_000;

    // On the loop: a snapshot of our endpoints, then the chores thread writes and reads the beacons.
    private void BeaconRound(bool store)
    {
        Node node = _node!;
        List<Endpoint> eps;
        Key32 pub;
        lock (node.Gate) { eps = node.Mesh.EndpointsNow(); pub = node.Handshaker.PublicKey; }
        string? to = store ? _cfg.BeaconStore : null, load = _cfg.BeaconLoad;
        _chores!.Post(() =>
        {
            if (to != null && eps.Count > 0) StoreBeacon(to, Beacon.Seal(_beaconKeys[0], pub, DateTimeOffset.UtcNow.ToUnixTimeSeconds(), eps));
            if (load != null) LoadBeacons(load);
        });
    }

    private void StoreBeacon(string where, string line)
    {
        if (!where.StartsWith('|')) { WriteAtomically(where, line + "\n", _log, "beacon_not_stored"); return; }
        if (Beacon.Run(where, line + "\n", BeaconCommandTimeoutMs, out string? error) == null)
            _log.Warn("beacon_not_stored", $"command=\"{where}\" error=\"{error}\"");
    }

    // On the chores thread: read, open and check every line; the loop applies the good ones.
    private void LoadBeacons(string from)
    {
        string? text, error = null;
        if (from.StartsWith('|')) text = Beacon.Run(from, null, BeaconCommandTimeoutMs, out error);
        else
        {
            try { text = new FileInfo(from).Length <= Beacon.MaxInputLen ? File.ReadAllText(from) : null; error = text == null ? "longer than 64 KiB" : null; }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { text = null; error = e.Message; }
        }
        if (text == null) { _log.Warn("beacons_not_loaded", $"from=\"{from}\" error=\"{error}\""); return; }
        var good = new List<(Key32, List<Endpoint>)>();
        int bad = 0;
        long now = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        foreach (string line in text.Split('\n'))
        {
            if (line.Trim().Length == 0) continue;
            var eps = new List<Endpoint>();
            if (Beacon.TryOpen(line, _beaconKeys, now, out Key32 key, eps) is string why)
            {
                bad++;
                if (_log.Wants(LogLevel.Warn, "beacon_ignored")) _log.Emit(LogLevel.Warn, "beacon_ignored", $"from=\"{from}\" reason=\"{why}\"");
                continue;
            }
            if (good.Count < Node.MaxStateMembers) good.Add((key, eps));
        }
        _chores!.Return(() =>
        {
            Node node = _node!;
            int used = 0;
            lock (node.Gate)
            {
                foreach (var (key, eps) in good) if (node.Remember(key, null, eps, Mono.NowMs())) used++;
                node.Mesh.BeaconsLoaded += used;
                node.Mesh.BeaconsRejected += bad;
            }
            if (used > 0 || bad > 0) _log.Info("beacons_loaded", $"from=\"{from}\" members={used} ignored={bad}");
        });
    }


    // The gateway forwards this public endpoint to us (PortMapper): members hear of it first.
    private void ApplyMapped(Endpoint ep)
    {
        Node node = _node!;
        lock (node.Gate)
        {
            if (node.Mesh.Mapped.Equals(ep)) return;
            node.Mesh.Mapped = ep;
            node.ScheduleExchange(Mono.NowMs());
        }
    }
}

// ==== 17. Control & management ===================================================================
// Everything that reports on or steers a running node, served on the loop thread that also carries
// the packets, so none of it may block: RequestServer keeps every connection of both endpoints below
// as a small state machine (a bounded request, a deadline, a bounded table; a slow or silent client
// costs one slot, never the loop).
//   ControlServer  a Unix stream socket (mode 0600): one request line — status, peers, routes (each
//                  optionally followed by "json"), reload, down — answered, then closed. Anything
//                  else gets "error:" and changes nothing.
//   MgmtServer     HTTP/1.1 on --mgmt: GET / (an HTML page), /status (JSON), /metrics (Prometheus text), /healthz,
//                  with an 8 KiB header limit; sources outside --mgmt-acl get 403.
//   StatusView     renders the node as text (like `wg show`), JSON (by hand: no reflection under
//                  NativeAOT) and Prometheus metrics; the JSON of `veil status --json` and GET /status
//                  are the same bytes.

internal sealed class StatusView(Node node, UpConfig cfg, int listenPort, long startedMs, Func<long>? clock = null)
{
    private long Now() => clock?.Invoke() ?? Mono.NowMs();
    internal IReadOnlyList<Worker> Workers { get; init; } = [];
    internal PortMapper? Mapper { get; init; }
    internal KernelRoutes? KernelRoutes { get; init; }
    // The wall clock is read once, here: process_start_time stays put when the clock is stepped later.
    private readonly long _startedUnixS = DateTimeOffset.UtcNow.ToUnixTimeSeconds() - ((clock?.Invoke() ?? Mono.NowMs()) - startedMs) / 1000;
    internal Lock Gate => node.Gate;             // held by whoever asks for a view (Metrics takes it itself)

    private const int MaxMetricPeers = 256;          // per-peer series are bounded; the rest are summed only
    private static readonly string Rid = RuntimeInformation.RuntimeIdentifier;

    // For people: the two largest units of an age, and bytes in IEC units.
    internal static string Age(long ms)
    {
        long sec = Math.Max(0, ms) / 1000;
        return sec < 60 ? $"{sec} s" : sec < 3600 ? $"{sec / 60} min {sec % 60} s" : sec < 86_400 ? $"{sec / 3600} h {sec % 3600 / 60} min" : $"{sec / 86_400} d {sec % 86_400 / 3600} h";
    }

    private static string Ago(long ms) => ms < 0 ? "never" : Age(ms) + " ago";

    internal static string Iec(long bytes)
    {
        if (bytes < 1024) return bytes + " B";
        double v = bytes;
        int unit = -1;
        while (v >= 1024 && unit < 4) { v /= 1024; unit++; }
        return v.ToString(v < 10 ? "0.00" : v < 100 ? "0.0" : "0", System.Globalization.CultureInfo.InvariantCulture) + " " + "KMGTP"[unit] + "iB";
    }

    private static string Rtt(long us) => us < 0 ? "-" : (us / 1000.0).ToString(us < 10_000 ? "0.00" : "0.0", System.Globalization.CultureInfo.InvariantCulture) + " ms";

    private static string FailureText(string reason) => reason switch
    {
        "no_answer" => "no answer to the last hello",
        "gave_up" => "no answer after every retransmit",
        "server_hello_auth" => "its answer did not authenticate (different --psk or wrong key)",
        "cookie" => "it is under load and sent a cookie",
        "no_endpoint" => "no endpoint known",
        _ => reason,
    };

    private int PeerCount()
    {
        int n = 0;
        foreach (Peer p in ActivePeers()) n++;
        return n;
    }

    private int PeersUp(long nowMs)
    {
        int n = 0;
        foreach (Peer p in ActivePeers()) if (p.StateName(nowMs, Spec.RejectAfterTimeMs) == "up") n++;
        return n;
    }

    // The exit node's default route is accepted (it is up and runs --exit).
    private bool ExitInUse()
    {
        foreach (Peer p in ActivePeers())
            if (cfg.ExitNode != null && p.Is(cfg.ExitNode))
                foreach (Claim c in p.Claims) if (c.Prefix.Bits == 0) return true;
        return false;
    }

    // What an operator should look at first: no peer up, a prefix two peers are allowed, a wall clock
    // stepped back since the start (hello timestamps come from it: peers refuse older ones).
    internal List<string> Warnings(long nowMs)
    {
        var w = new List<string>();
        if (PeersUp(nowMs) == 0) w.Add(PeerCount() == 0 ? "no peers" : "no peer up");
        var owner = new Dictionary<IpPrefix, string>();
        foreach (Peer p in ActivePeers())
            foreach (IpPrefix a in p.Allowed)
                if (owner.TryGetValue(a, out string? other)) { if (w.Count < 8) w.Add($"route conflict: {a} is allowed for {other} and {p.Name}"); }
                else owner[a] = p.Name;
        if (cfg.ExitNode != null && !ExitInUse()) w.Add($"exit node {cfg.ExitNode} offers no default route (not up, or not an --exit): traffic for the exit is refused until it does");
        if (KernelRoutes != null)
            foreach (var (pr, why) in KernelRoutes.Conflicts) if (w.Count < 8) w.Add($"route conflict: {pr}: {why}");
        long jumpS = DateTimeOffset.UtcNow.ToUnixTimeSeconds() - (_startedUnixS + (nowMs - startedMs) / 1000);
        // Only back: a step forward (NTP setting a router's clock after boot) is harmless.
        if (jumpS < -60) w.Add($"clock stepped back {Age(-jumpS * 1000)} since start: peers may ignore our hellos until it catches up");
        return w;
    }

    /// <summary>The control socket's "health": "ok: …" with a peer up, else "down: …" (`veil status` exits 3).</summary>
    internal string Health()
    {
        long nowMs = Now();
        int up = PeersUp(nowMs), total = PeerCount();
        if (up > 0) return $"ok: {up} of {total} peers up\n";
        return total == 0 ? "down: no peers\n" : $"down: no peer up (for {Age(nowMs - NoPeerUpSinceMs())})\n";
    }

    /// <summary>For /healthz: null when healthy, else why not. Down
    /// only once no peer has been up for longer than graceMs (since the start or the last peer_down).</summary>
    internal string? Unhealthy(long graceMs)
    {
        long nowMs = Now();
        if (PeersUp(nowMs) > 0) return null;
        long since = NoPeerUpSinceMs();
        return nowMs - since > graceMs ? $"no peer up for {Age(nowMs - since)}" : null;
    }

    // The start, or when the last peer went down; removed peers count (RemovePeer notes when).
    private long NoPeerUpSinceMs()
    {
        long since = startedMs;
        foreach (Peer p in node.Peers) since = Math.Max(since, p.DownAtMs);
        return since;
    }

    private static string CipherName(AeadKind k) => k == AeadKind.Aes256Gcm ? "aes-256-gcm" : "chacha20-poly1305";   // as --cipher names it

    private (string Name, bool On)[] Offloads() => Worker.Offloads(Workers.Count > 0 ? Workers[0].Tun : null, Workers.Count > 0 ? Workers[0].Udp : null);

    private static void Str(StringBuilder sb, string s) => JsonText.Str(sb, s);

    // A TCP link shows as tcp:REMOTE (its 100::/64 stand-in means nothing outside this process).
    private string EndpointText(in Endpoint e) => TcpLinks.IsTcp(e) ? "tcp:" + node.Tcp?.RemoteOf(e) : e.ToString();

    // A removed peer stays in node.Peers until a new peer reuses its slot (ids are indexes): skip it.
    private IEnumerable<Peer> ActivePeers()
    {
        foreach (Peer p in node.Peers)
            if (p.Active) yield return p;
    }

    // The layout follows `wg show` so an operator who knows WireGuard reads it at a glance; it is for
    // people, and scripts should read Json instead. Must hold node.Gate.
    internal string Text()
    {
        long nowMs = Now();
        var sb = new StringBuilder();
        sb.Append("interface: ").Append(cfg.TunName).Append('\n');
        sb.Append("  public key: ").Append(node.Handshaker.PublicKey.ToBase64()).Append('\n');
        sb.Append("  listening port: ").Append(listenPort).Append('\n');
        sb.Append("  addresses: ").Append(string.Join(", ", cfg.Addresses)).Append('\n');
        sb.Append("  mtu: ").Append(cfg.Mtu).Append("  uptime: ").Append(Age(nowMs - startedMs)).Append('\n');
        if (node.Mode != L2Mode.Tun)
            sb.Append("  mode: ").Append(UpConfig.ModeName(node.Mode)).Append(" (").Append(node.Macs.Count).Append(" MACs learned, ")
              .Append(node.FramesSwitched).Append(" frames switched, ").Append(node.FramesFlooded).Append(" flooded)\n");
        int total = PeerCount();
        sb.Append("  peers: ").Append(PeersUp(nowMs)).Append(" of ").Append(total).Append(" up\n");
        if (cfg.Exit) sb.Append("  exit: offered (0.0.0.0/0 and ::/0 announced; members masqueraded out of the other interfaces)")
                        .Append(cfg.ExitFor.Count > 0 ? " to " + string.Join(", ", cfg.ExitFor) + "\n" : "\n");
        if (cfg.ExitNode != null) sb.Append("  exit node: ").Append(cfg.ExitNode).Append(ExitInUse() ? " (in use: table 51820)\n" : " (not in use: no default route from it yet)\n");
        if (node.Filter is PacketFilter f)
        {
            sb.Append("  filter: ").Append(f.LiveFlows(nowMs)).Append(" flows, ").Append(f.Refused).Append(" refused by no rule\n");
            foreach (PacketFilter.Rule r in f.Rules) sb.Append("    ").Append(r.Text).Append("  (").Append(r.Hits).Append(" hits)\n");
        }
        foreach (string w in Warnings(nowMs)) sb.Append("  warning: ").Append(w).Append('\n');
        sb.Append("  data path:");
        foreach (var (name, on) in Offloads()) sb.Append(' ').Append(name).Append(on ? " on," : " off,");
        sb.Append(" aead ").Append(Aead.Backend).Append(", ").Append(Workers.Count).Append(Workers.Count == 1 ? " worker\n" : " workers\n");
        Counters c = node.Counters;
        sb.Append("  records: ").Append(c.RxRecords).Append(" received, ").Append(c.TxRecords).Append(" sent")
          .Append("  handshakes: ").Append(c.HandshakesCompleted).Append('\n');
        sb.Append("  drops:");
        int dropKinds = 0;
        for (int i = 0; i < (int)DropReason.Count; i++)
            // link_local is the kernel's own chatter (router solicitations, MLD), not a problem to read about.
            if (c.Drops[i] > 0 && i != (int)DropReason.LinkLocal) { sb.Append(' ').Append(Counters.DropName((DropReason)i)).Append('=').Append(c.Drops[i]); dropKinds++; }
        sb.Append(dropKinds == 0 ? " none\n" : "\n");
        if (Mapper?.Current is PortMapper.State pm)
            sb.Append("  port mapping: ").Append(pm.Error == null ? $"{pm.Protocol} {pm.External} via {pm.Gateway} (lifetime {pm.LifetimeS} s)" : $"none ({pm.Error})").Append('\n');
        foreach (Peer p in ActivePeers()) PeerText(sb, p, nowMs);
        return sb.ToString();
    }

    private void PeerText(StringBuilder sb, Peer p, long nowMs)
    {
        sb.Append("\npeer: ").Append(p.Name).Append(" (").Append(p.PublicKey.ToBase64()).Append(")\n");
        string state = p.StateName(nowMs, Spec.RejectAfterTimeMs);
        sb.Append("  state: ").Append(state).Append('\n');
        if (state == "handshaking")
            sb.Append("  handshake: attempt ").Append(p.HandshakeAttempts).Append(", next in ").Append(Age(p.RetransmitHandshakeAtMs - nowMs)).Append('\n');
        if (state != "up" && p.LastFailure.Length > 0)
            sb.Append("  last failure: ").Append(FailureText(p.LastFailure)).Append(" (").Append(Ago(nowMs - p.LastFailureMs)).Append(")\n");
        if (p.Endpoint.IsSet) sb.Append("  endpoint: ").Append(EndpointText(p.Endpoint)).Append(EndpointName(p) is string en ? $" (from {en})" : "").Append('\n');
        else if (EndpointName(p) is string en) sb.Append("  endpoint: ").Append(en).Append(" (not resolved yet)\n");
        if (p.EndpointChanges > 0) sb.Append("  endpoint changes: ").Append(p.EndpointChanges).Append(" (before: ").Append(p.PreviousEndpoint).Append(")\n");
        if (p.RttUs >= 0) sb.Append("  rtt: ").Append(Rtt(p.RttUs)).Append(" (latest handshake)\n");
        sb.Append("  path: ").Append(p.PathName).Append('\n');
        sb.Append("  source: ").Append(Source(p)).Append('\n');
        sb.Append("  allowed ips: ").Append(p.Allowed.Count == 0 ? "(none)" : string.Join(", ", p.Allowed)).Append('\n');
        if (p.Claims.Count > 0) sb.Append("  claims: ").Append(string.Join(", ", p.Claims.ConvertAll(c => $"{c.Prefix} metric {c.Metric}"))).Append('\n');
        sb.Append("  latest handshake: ").Append(Ago(p.LastHandshakeMs < 0 ? -1 : nowMs - p.LastHandshakeMs)).Append('\n');
        if (p.Current != null) sb.Append("  cipher: ").Append(CipherName(p.Current.AeadKind)).Append('\n');
        sb.Append("  transfer: ").Append(Iec(p.RxBytes)).Append(" received, ").Append(Iec(p.TxBytes)).Append(" sent\n");
        if (p.PersistentKeepaliveMs > 0) sb.Append("  persistent keepalive: every ").Append(p.PersistentKeepaliveMs / 1000).Append(" s\n");
    }

    /// <summary>`veil netcheck`: where members see this node, whether that depends on who looks
    /// (a NAT that maps per destination cannot be punched), the gateway's port mapping, the relay,
    /// and the path to each peer.</summary>
    internal string Netcheck()
    {
        var sb = new StringBuilder("public endpoint, as members that reach us directly see it:\n");
        // RFC 4787's terms: two members that see one address at one port show an endpoint-independent
        // mapping; one address seen at two ports means the NAT chose a port per destination.
        var seen = new Dictionary<UInt128, (int Members, HashSet<int> Ports)>();     // by address: who saw it, at which ports
        foreach (Peer p in ActivePeers())
        {
            if (!p.Up || p.Relay != null || !p.SeesUsAt.IsSet) continue;
            sb.Append("  ").Append(p.Name).Append(" sees ").Append(p.SeesUsAt).Append('\n');
            var (members, ports) = seen.TryGetValue(p.SeesUsAt.Address, out var v) ? v : (0, new HashSet<int>());
            ports.Add(p.SeesUsAt.Port);
            seen[p.SeesUsAt.Address] = (members + 1, ports);
        }
        if (seen.Count == 0) sb.Append("  (no member reachable directly has told us yet)\n");
        bool varies = false, same = false;
        foreach (var (members, ports) in seen.Values) { varies |= ports.Count > 1; same |= members > 1 && ports.Count == 1; }
        sb.Append("mapping: ").Append(varies ? "varies by destination (symmetric NAT): members behind other NATs reach us through a relay or the port mapping"
            : same ? "the same for every member (endpoint-independent): punching can work"
            : "unknown (it takes two members seeing the same address)").Append('\n');
        sb.Append("port mapping: ");
        if (Mapper?.Current is not PortMapper.State pm) sb.Append("off (--no-port-mapping)\n");
        else if (pm.Error == null) sb.Append($"{pm.Protocol} {pm.External} via {pm.Gateway}, lifetime {pm.LifetimeS} s\n");
        else sb.Append($"none (tried {(pm.Tried.Length > 0 ? pm.Tried : "nothing")}: {pm.Error})\n");
        Relays r = node.Relays;
        sb.Append("relay: ").Append(r.Offered ? $"offered, {r.RateBytesPerS / 125_000} Mbit/s per pair; carrying {r.Pairs} pair directions, {r.Bytes} bytes so far" : "not offered (--no-relay)").Append('\n');
        sb.Append("paths:\n");
        foreach (Peer p in ActivePeers())
            sb.Append("  ").Append(p.Name).Append(": ").Append(p.Up ? p.PathName : p.State.ToString().ToLowerInvariant())
              .Append(p.Endpoint.IsSet ? " " + p.Endpoint : "").Append(p.Relay != null ? $" (punches {p.PunchesSent} sent, {p.PunchesAnswered} answered)" : "").Append('\n');
        return sb.ToString();
    }

    internal string PeersText()
    {
        long nowMs = Now();
        var sb = new StringBuilder();
        foreach (Peer p in ActivePeers()) PeerText(sb, p, nowMs);
        return sb.Length == 0 ? "no peers\n" : sb.ToString()[1..];
    }

    private static string Source(Peer p) => p.Learned ? "learned" : "static";

    // The configured endpoint when it is a DNS name (HOST:PORT), which the resolved endpoint hides.
    private static string? EndpointName(Peer p) =>
        p.ConfiguredEndpoint.Length > 0 && Endpoint.TrySplitHostPort(p.ConfiguredEndpoint, out string host, out _) && !IPAddress.TryParse(host, out _)
            ? p.ConfiguredEndpoint : null;

    // The overlay address people know a peer by: its first allowed host prefix, else its first prefix.
    private static string OverlayAddress(Peer p)
    {
        foreach (IpPrefix a in p.Allowed) if (a.Bits == (a.IsV6 ? 128 : 32)) return a.ToString().Split('/')[0];
        return p.Allowed.Count > 0 ? p.Allowed[0].ToString() : "-";
    }

    /// <summary>`veil status --short`: a line for the node, then one per peer (like `tailscale status`).</summary>
    internal string Short()
    {
        long nowMs = Now();
        var sb = new StringBuilder();
        int total = PeerCount();
        sb.Append("# ").Append(cfg.TunName).Append(cfg.Addresses.Count > 0 ? " " + string.Join(",", cfg.Addresses) : "").Append(", ").Append(PeersUp(nowMs)).Append(" of ").Append(total).Append(" peers up");
        foreach (string w in Warnings(nowMs)) sb.Append("; ").Append(w);
        sb.Append('\n');
        foreach (Peer p in ActivePeers())
            sb.Append(OverlayAddress(p).PadRight(16)).Append(' ').Append(p.Name.PadRight(16)).Append(' ').Append(p.StateName(nowMs, Spec.RejectAfterTimeMs).PadRight(11))
              .Append(' ').Append(p.PathName.PadRight(12)).Append(" rtt ").Append(Rtt(p.RttUs).PadRight(9)).Append(" rx ").Append(Iec(p.RxBytes).PadRight(10))
              .Append(" tx ").Append(Iec(p.TxBytes).PadRight(10)).Append(" handshake ").Append(Ago(p.LastHandshakeMs < 0 ? -1 : nowMs - p.LastHandshakeMs)).Append('\n');
        return sb.ToString();
    }

    /// <summary>`veil status --dump`: tab-separated for scripts (busybox awk), like `wg show dump`.
    /// A node line, then a peer line each; "-" for what is unknown or never, so no field is empty.</summary>
    internal string Dump()
    {
        long nowMs = Now();
        var sb = new StringBuilder();
        int total = PeerCount();
        sb.Append("node\t").Append(cfg.TunName).Append('\t').Append(node.Handshaker.PublicKey.ToBase64()).Append('\t').Append(listenPort)
          .Append('\t').Append(cfg.Mtu).Append('\t').Append(PeersUp(nowMs)).Append('\t').Append(total).Append('\t').Append((nowMs - startedMs) / 1000).Append('\n');
        foreach (Peer p in ActivePeers())
        {
            sb.Append("peer\t").Append(p.Name).Append('\t').Append(p.PublicKey.ToBase64()).Append('\t').Append(p.Endpoint.IsSet ? EndpointText(p.Endpoint) : "-")
              .Append('\t').Append(p.Allowed.Count > 0 ? string.Join(",", p.Allowed) : "-").Append('\t').Append(p.StateName(nowMs, Spec.RejectAfterTimeMs))
              .Append('\t').Append(p.PathName).Append('\t').Append(p.LastHandshakeUnixS > 0 ? p.LastHandshakeUnixS.ToString() : "-")
              .Append('\t').Append(p.RxBytes).Append('\t').Append(p.TxBytes).Append('\t').Append(p.RttUs >= 0 ? p.RttUs.ToString() : "-")
              .Append('\t').Append(p.PersistentKeepaliveMs > 0 ? (p.PersistentKeepaliveMs / 1000).ToString() : "-").Append('\t').Append(p.EndpointChanges).Append('\n');
        }
        return sb.ToString();
    }

    // --mode tap|hub (§8.1): what was switched and flooded, and the MAC table (idle entries left out).
    private void SwitchJson(StringBuilder sb, long nowMs)
    {
        if (node.Mode == L2Mode.Tun) return;
        MacTable t = node.Macs;
        sb.Append(",\"switch\":{\"mode\":\"").Append(UpConfig.ModeName(node.Mode)).Append("\",\"switched\":").Append(node.FramesSwitched)
          .Append(",\"flooded\":").Append(node.FramesFlooded).Append(",\"unknown\":").Append(node.FramesUnknown)
          .Append(",\"moves\":").Append(t.Moves).Append(",\"refused\":").Append(t.Refusals)
          .Append(",\"max_macs\":").Append(MacTable.MaxEntries).Append(",\"max_macs_per_peer\":").Append(MacTable.MaxPerPeer).Append(",\"macs\":[");
        bool first = true;
        foreach (var (mac, e) in t)
        {
            if (nowMs - e.SeenMs >= MacTable.IdleMs || !node.Peers[e.PeerId].Active) continue;
            sb.Append(first ? "{\"mac\":\"" : ",{\"mac\":\"").Append(Ethernet.MacText(mac)).Append("\",\"peer\":");
            Str(sb, node.Peers[e.PeerId].Name);
            sb.Append(",\"age_seconds\":").Append((nowMs - e.SeenMs) / 1000).Append('}');
            first = false;
        }
        sb.Append("]}");
    }

    internal string RoutesText()
    {
        var sb = new StringBuilder();
        foreach (RouteEntry r in node.RouteList)
            // 44 columns hold the longest IPv6 prefix ("ffff:…:ffff/128", 43 characters).
            sb.Append(r.Prefix.ToString().PadRight(44)).Append(' ').Append(node.Peers[r.PeerId].Name.PadRight(16))
              .Append(r.Claim ? " claim metric " + r.Metric : " allow").Append('\n');
        return sb.Length == 0 ? "no routes\n" : sb.ToString();
    }

    // Written by hand (no reflection-based serializer under NativeAOT). Key names are an interface that
    // scripts and tests read (jq in tests/netns): add keys, never rename them. Must hold node.Gate.
    internal string Json()
    {
        long nowMs = Now();
        Counters c = node.Counters;
        var sb = new StringBuilder();
        sb.Append("{\"version\":\"").Append(Cli.Version).Append("\",\"node\":{\"public_key\":\"").Append(node.Handshaker.PublicKey.ToBase64())
          .Append("\",\"listen_port\":").Append(listenPort).Append(",\"tun\":");
        Str(sb, cfg.TunName);
        sb.Append(",\"mtu\":").Append(cfg.Mtu).Append(",\"addresses\":[");
        for (int i = 0; i < cfg.Addresses.Count; i++) sb.Append(i > 0 ? "," : "").Append('"').Append(cfg.Addresses[i]).Append('"');
        sb.Append("],\"datapath\":{");
        foreach (var (name, on) in Offloads()) sb.Append('"').Append(name).Append("\":").Append(on ? "true," : "false,");
        sb.Append("\"aead_backend\":\"").Append(Aead.Backend).Append("\"}");
        sb.Append("},\"uptime_seconds\":").Append((nowMs - startedMs) / 1000).Append(",\"peers_up\":").Append(PeersUp(nowMs)).Append(",\"warnings\":[");
        List<string> warnings = Warnings(nowMs);
        for (int i = 0; i < warnings.Count; i++) { if (i > 0) sb.Append(','); Str(sb, warnings[i]); }
        sb.Append("],\"workers\":[");
        for (int i = 0; i < Workers.Count; i++)
            sb.Append(i > 0 ? "," : "").Append("{\"tun_packets\":").Append(Workers[i].TunPackets).Append(",\"udp_datagrams\":").Append(Workers[i].UdpDatagrams)
              .Append(",\"handshake_datagrams\":").Append(Workers[i].HandshakeDatagrams).Append('}');
        sb.Append("],");
        sb.Append("\"counters\":{\"rx_records\":").Append(c.RxRecords).Append(",\"tx_records\":").Append(c.TxRecords)
          .Append(",\"rx_bytes\":").Append(c.RxBytes).Append(",\"tx_bytes\":").Append(c.TxBytes)
          .Append(",\"handshakes_initiated\":").Append(c.HandshakesInitiated)
          .Append(",\"handshakes_completed\":").Append(c.HandshakesCompleted)
          .Append(",\"cookies_sent\":").Append(c.CookiesSent)
          .Append(",\"hellos_repeated\":").Append(c.HellosRepeated).Append(",\"answers_repeated\":").Append(c.AnswersRepeated)
          .Append(",\"tun_rx_packets\":").Append(c.TunRxPackets).Append(",\"tun_tx_packets\":").Append(c.TunTxPackets)
          .Append(",\"tun_super_packets\":").Append(c.TunSuperPackets).Append(",\"tun_coalesced\":").Append(c.TunCoalesced)
          .Append(",\"gc_collections\":[").Append(GC.CollectionCount(0)).Append(',').Append(GC.CollectionCount(1)).Append(',').Append(GC.CollectionCount(2))
          .Append("],\"allocated_bytes\":").Append(GC.GetTotalAllocatedBytes()).Append("},\"drops\":{");
        for (int i = 0; i < (int)DropReason.Count; i++)
            sb.Append(i > 0 ? "," : "").Append('"').Append(Counters.DropName((DropReason)i)).Append("\":").Append(c.Drops[i]);
        sb.Append("},\"sessions\":[");
        bool first = true;
        foreach (Peer p in ActivePeers())
            foreach (var (slot, s) in new[] { ("previous", p.Previous), ("current", p.Current), ("next", p.Next) })
            {
                if (s == null) continue;
                sb.Append(first ? "" : ",").Append("{\"peer\":");
                Str(sb, p.Name);
                sb.Append(",\"slot\":\"").Append(slot).Append("\",\"role\":\"").Append(s.IsInitiator ? "initiator" : "responder")
                  .Append("\",\"aead\":\"").Append(CipherName(s.AeadKind))
                  .Append("\",\"age_seconds\":").Append((nowMs - s.CreatedMs) / 1000).Append(",\"sent_records\":").Append(s.SendCounter).Append('}');
                first = false;
            }
        sb.Append("],\"peers\":");
        PeersJson(sb, nowMs);
        sb.Append(",\"routes\":");
        RoutesJson(sb);
        Admission a = node.Admission;
        sb.Append(",\"admission\":{\"handshake_rate\":").Append(a.Rate).Append(",\"handshake_rate_per_source\":").Append(a.RatePerSource)
          .Append(",\"max_sessions\":").Append(a.MaxSessions).Append(",\"peers_with_sessions\":").Append(node.PeersHoldingKeys())
          .Append(",\"sessions\":").Append(node.Indexes.SessionCount)
          .Append(",\"tracked_sources\":").Append(a.TrackedSources)
          .Append(",\"refused\":{\"rate_source\":").Append(a.RefusedSource).Append(",\"rate_global\":").Append(a.RefusedGlobal)
          .Append(",\"max_sessions\":").Append(a.RefusedSessions).Append(",\"cookie_budget\":").Append(a.RefusedCookies).Append("}}");
        Mesh m = node.Mesh;
        sb.Append(",\"mesh\":{\"name\":");
        Str(sb, m.Name);
        sb.Append(",\"policy\":\"").Append(m.Open ? "network" : "explicit").Append("\",\"endpoints\":[");
        // The mapped, local and observed endpoints, each once (a mapped one is often observed too).
        var announced = new List<Endpoint>();
        if (m.Mapped.IsSet) announced.Add(m.Mapped);
        foreach (Endpoint e in m.LocalEndpoints) if (!announced.Contains(e)) announced.Add(e);
        foreach (Endpoint e in m.Observed) if (!announced.Contains(e)) announced.Add(e);
        for (int i = 0; i < announced.Count; i++) sb.Append(i > 0 ? "," : "").Append('"').Append(announced[i]).Append('"');
        sb.Append("],\"claims\":[");
        for (int i = 0; i < m.OwnClaims.Count; i++) sb.Append(i > 0 ? "," : "").Append('"').Append(m.OwnClaims[i].Prefix).Append('"');
        sb.Append("],\"exchange_sent_messages\":").Append(m.SentMessages).Append(",\"exchange_sent_bytes\":").Append(m.SentBytes)
          .Append(",\"exchange_received_messages\":").Append(m.ReceivedMessages).Append(",\"exchange_rejected\":").Append(m.Rejected)
          .Append(",\"claims_refused\":").Append(m.ClaimsRefused).Append(",\"members_learned\":").Append(m.MembersLearned)
          .Append(",\"members_forgotten\":").Append(m.MembersForgotten)
          .Append(",\"admin_key\":").Append(m.AdminKey != null ? "\"" + Convert.ToBase64String(m.AdminKey) + "\"" : "null")
          .Append(",\"revocations\":").Append(m.RevocationCount).Append(",\"revocations_rejected\":").Append(m.RevocationsRejected)
          .Append(",\"revoked_refused\":").Append(m.RevokedRefused)
          .Append(",\"isolating\":").Append(m.OwnMarks.Count).Append(",\"isolated_by_members\":").Append(m.BarredCount)
          .Append(",\"isolated_refused\":").Append(m.IsolatedRefused).Append(",\"isolation_marks_dropped\":").Append(m.MarksDropped)
          .Append(",\"beacons_loaded\":").Append(m.BeaconsLoaded).Append(",\"beacons_rejected\":").Append(m.BeaconsRejected).Append('}');
        sb.Append(",\"fec\":{\"mode\":\"").Append(node.FecAuto ? "auto" : "off").Append("\",\"parity_sent\":").Append(node.FecParitySent)
          .Append(",\"parity_bytes\":").Append(node.FecParityBytes).Append(",\"parity_received\":").Append(node.FecParityReceived)
          .Append(",\"recovered\":").Append(node.FecRecovered).Append(",\"unrecoverable\":").Append(node.FecUnrecoverable)
          .Append(",\"no_room\":").Append(node.FecNoRoom).Append(",\"late\":").Append(node.FecLate)
          .Append(",\"refused\":").Append(node.FecRefused).Append('}');
        SwitchJson(sb, nowMs);
        Relays r = node.Relays;
        sb.Append(",\"relay\":{\"offered\":").Append(r.Offered ? "true" : "false").Append(",\"rate_mbit\":").Append(r.RateBytesPerS / 125_000)
          .Append(",\"flows\":").Append(r.Pairs).Append(",\"bytes\":").Append(r.Bytes).Append(",\"records\":").Append(r.Records)
          .Append(",\"refused\":").Append(r.Refused).Append(",\"rate_limited\":").Append(r.RateLimited)
          .Append(",\"refusals_told\":").Append(r.RefusalsTold).Append(",\"refusals_heard\":").Append(r.RefusalsHeard).Append('}');
        sb.Append(",\"exit\":{\"offered\":").Append(cfg.Exit ? "true" : "false").Append(",\"node\":");
        if (cfg.ExitNode != null) Str(sb, cfg.ExitNode); else sb.Append("null");
        sb.Append(",\"in_use\":").Append(ExitInUse() ? "true" : "false").Append(",\"for\":");
        if (cfg.ExitFor.Count == 0) sb.Append("null");
        else
        {
            sb.Append('[');
            for (int i = 0; i < cfg.ExitFor.Count; i++) { if (i > 0) sb.Append(','); Str(sb, cfg.ExitFor[i]); }
            sb.Append(']');
        }
        sb.Append('}');
        if (node.Filter is PacketFilter f)
        {
            sb.Append(",\"filter\":{\"flows\":").Append(f.LiveFlows(Now())).Append(",\"refused\":").Append(f.Refused).Append(",\"rules\":[");
            for (int i = 0; i < f.Rules.Length; i++)
            {
                sb.Append(i > 0 ? ",{\"rule\":" : "{\"rule\":");
                Str(sb, f.Rules[i].Text);
                sb.Append(",\"hits\":").Append(f.Rules[i].Hits).Append('}');
            }
            sb.Append("]}");
        }
        if (node.Tcp is TcpLinks tcp)
            sb.Append(",\"tcp\":{\"listen_port\":").Append(tcp.ListenPort).Append(",\"connections\":").Append(tcp.Count)
              .Append(",\"accepted\":").Append(tcp.Accepted).Append(",\"refused\":").Append(tcp.Refused).Append(",\"closed\":").Append(tcp.Closed)
              .Append(",\"malformed\":").Append(tcp.Malformed).Append(",\"dropped_full\":").Append(tcp.DroppedFull).Append('}');
        sb.Append(",\"port_mapping\":");
        if (Mapper?.Current is not PortMapper.State pm) sb.Append("{\"enabled\":false}");
        else
        {
            void StrOrNull(string? v) { if (v != null) Str(sb, v); else sb.Append("null"); }
            sb.Append("{\"enabled\":true,\"protocol\":");
            StrOrNull(pm.Protocol.Length > 0 ? pm.Protocol : null);
            sb.Append(",\"gateway\":");
            StrOrNull(pm.Gateway?.ToString());
            sb.Append(",\"external\":");
            StrOrNull(pm.External.IsSet ? pm.External.ToString() : null);
            sb.Append(",\"lifetime_s\":").Append(pm.LifetimeS).Append(",\"tried\":");
            Str(sb, pm.Tried);
            sb.Append(",\"error\":");
            StrOrNull(pm.Error);
            sb.Append('}');
        }
        sb.Append("}\n");
        return sb.ToString();
    }

    internal string PeersJson()
    {
        var sb = new StringBuilder();
        PeersJson(sb, Now());
        return sb.Append('\n').ToString();
    }

    private void PeersJson(StringBuilder sb, long nowMs)
    {
        sb.Append('[');
        bool first = true;
        foreach (Peer p in ActivePeers())
        {
            sb.Append(first ? "" : ",").Append("{\"name\":");
            Str(sb, p.Name);
            sb.Append(",\"public_key\":\"").Append(p.PublicKey.ToBase64())
              .Append("\",\"endpoint\":").Append(p.Endpoint.IsSet ? "\"" + EndpointText(p.Endpoint) + "\"" : "null")
              .Append(",\"state\":\"").Append(p.StateName(nowMs, Spec.RejectAfterTimeMs))
              .Append("\",\"up_s\":").Append(p.Up ? ((nowMs - p.UpAtMs) / 1000.0).ToString("0.###", System.Globalization.CultureInfo.InvariantCulture) : "null")
              .Append(",\"path\":\"").Append(p.PathName).Append("\",\"relay_offer\":");
            if (p.RelayOffer != null) Str(sb, p.RelayOffer.Name);
            else sb.Append("null");
            sb.Append(",\"isolated\":").Append(p.Isolated ? "true" : "false")
              .Append(",\"relayed_rx_bytes\":").Append(p.RelayedRxBytes).Append(",\"relayed_tx_bytes\":").Append(p.RelayedTxBytes)
              .Append(",\"loss_pct\":").Append((p.LossBp / 100.0).ToString("0.##", System.Globalization.CultureInfo.InvariantCulture))
              .Append(",\"peer_loss_pct\":").Append((p.FecReportedBp / 100.0).ToString("0.##", System.Globalization.CultureInfo.InvariantCulture))
              .Append(",\"parity_group\":").Append(p.FecOut is { } fo && p.FecReportedBp > 0 ? fo.Want : 0)
              .Append(",\"parity_bytes\":").Append(p.FecOut?.ParityBytes ?? 0)
              .Append(",\"punches_sent\":").Append(p.PunchesSent).Append(",\"punches_answered\":").Append(p.PunchesAnswered)
              .Append(",\"last_direct_s\":").Append(p.LastDirectRxMs < 0 ? "null" : ((nowMs - p.LastDirectRxMs) / 1000).ToString())
              .Append(",\"sees_us_at\":").Append(p.SeesUsAt.IsSet ? "\"" + p.SeesUsAt + "\"" : "null")
              .Append(",\"latest_handshake\":").Append(p.LastHandshakeUnixS > 0 ? p.LastHandshakeUnixS.ToString() : "null")
              .Append(",\"latest_handshake_s\":").Append(p.LastHandshakeMs < 0 ? "null" : ((nowMs - p.LastHandshakeMs) / 1000).ToString())
              .Append(",\"rtt_ms\":").Append(p.RttUs < 0 ? "null" : (p.RttUs / 1000.0).ToString("0.###", System.Globalization.CultureInfo.InvariantCulture))
              .Append(",\"handshake\":{\"attempts\":").Append(p.Pending != null ? p.HandshakeAttempts : 0)
              .Append(",\"next_retry_s\":").Append(p.Pending != null ? (Math.Max(0, p.RetransmitHandshakeAtMs - nowMs) / 1000).ToString() : "null")
              .Append(",\"last_failure\":").Append(p.LastFailure.Length > 0 ? "\"" + p.LastFailure + "\"" : "null")
              .Append(",\"last_failure_s\":").Append(p.LastFailureMs < 0 ? "null" : ((nowMs - p.LastFailureMs) / 1000).ToString()).Append('}')
              .Append(",\"endpoint_name\":");
            if (EndpointName(p) is string en) Str(sb, en);
            else sb.Append("null");
            sb.Append(",\"endpoint_changes\":").Append(p.EndpointChanges)
              .Append(",\"previous_endpoint\":").Append(p.EndpointChanges > 0 ? "\"" + p.PreviousEndpoint + "\"" : "null")
              .Append(",\"rx_bytes\":").Append(p.RxBytes).Append(",\"tx_bytes\":").Append(p.TxBytes)
              .Append(",\"handshakes\":").Append(p.Handshakes)
              .Append(",\"keepalive_seconds\":").Append(p.PersistentKeepaliveMs / 1000)
              .Append(",\"aead\":").Append(p.Current != null ? "\"" + CipherName(p.Current.AeadKind) + "\"" : "null")
              .Append(",\"source\":\"").Append(Source(p))
              .Append("\",\"last_seen_s\":").Append(p.LastRxMs < 0 ? "null" : ((nowMs - p.LastRxMs) / 1000).ToString())
              .Append(",\"allowed\":[");
            for (int j = 0; j < p.Allowed.Count; j++) sb.Append(j > 0 ? "," : "").Append('"').Append(p.Allowed[j]).Append('"');
            sb.Append("],\"claims\":[");
            for (int j = 0; j < p.Claims.Count; j++)
                sb.Append(j > 0 ? "," : "").Append("{\"prefix\":\"").Append(p.Claims[j].Prefix).Append("\",\"metric\":").Append(p.Claims[j].Metric).Append('}');
            sb.Append("]}");
            first = false;
        }
        sb.Append(']');
    }

    internal string RoutesJson()
    {
        var sb = new StringBuilder();
        RoutesJson(sb);
        return sb.Append('\n').ToString();
    }

    private void RoutesJson(StringBuilder sb)
    {
        sb.Append('[');
        bool first = true;
        foreach (RouteEntry r in node.RouteList)
        {
            sb.Append(first ? "" : ",").Append("{\"prefix\":\"").Append(r.Prefix).Append("\",\"peer\":");
            Str(sb, node.Peers[r.PeerId].Name);
            sb.Append(",\"metric\":").Append(r.Metric).Append(",\"origin\":\"").Append(r.Claim ? "claim" : "allow").Append("\"}");
            first = false;
        }
        sb.Append(']');
    }

    // Takes node.Gate itself, unlike the other views: the management endpoint calls it bare.
    /// <summary>Prometheus text exposition format 0.0.4.</summary>
    internal string Metrics()
    {
        // The process's figures come from /proc: read before the node's lock is taken.
        long rss = Environment.WorkingSet;
        double cpuS = Environment.CpuUsage.TotalTime.TotalSeconds;
        lock (node.Gate)
        {
            long nowMs = Now();
            Counters c = node.Counters;
            var sb = new StringBuilder();
            void Head(string name, string type, string help) =>
                sb.Append("# HELP ").Append(name).Append(' ').Append(help).Append("\n# TYPE ").Append(name).Append(' ').Append(type).Append('\n');
            void One(string name, string type, string help, double v)
            {
                Head(name, type, help);
                sb.Append(name).Append(' ').Append(v.ToString(System.Globalization.CultureInfo.InvariantCulture)).Append('\n');
            }
            Head("veil_build_info", "gauge", "Version and runtime identifier of this binary.");
            sb.Append("veil_build_info{version=\"").Append(Cli.Version).Append("\",rid=\"").Append(Rid).Append("\"} 1\n");
            One("veil_uptime_seconds", "gauge", "Seconds since the daemon started.", (nowMs - startedMs) / 1000.0);
            Head("veil_peers", "gauge", "Configured peers by state.");
            foreach (string st in new[] { "up", "handshaking", "down" })
            {
                int n = 0;
                foreach (Peer p in ActivePeers()) if (p.StateName(nowMs, Spec.RejectAfterTimeMs) == st) n++;
                sb.Append("veil_peers{state=\"").Append(st).Append("\"} ").Append(n).Append('\n');
            }
            One("veil_sessions", "gauge", "Sessions (key pairs) held.", node.Indexes.SessionCount);
            One("veil_received_records_total", "counter", "Transport records received and authenticated.", c.RxRecords);
            One("veil_sent_records_total", "counter", "Transport records sent.", c.TxRecords);
            One("veil_received_bytes_total", "counter", "Bytes of authenticated records received.", c.RxBytes);
            One("veil_sent_bytes_total", "counter", "Bytes of records sent.", c.TxBytes);
            One("veil_tun_received_packets_total", "counter", "Packets read from the TUN device.", c.TunRxPackets);
            One("veil_tun_sent_packets_total", "counter", "Packets written to the TUN device.", c.TunTxPackets);
            One("veil_tun_super_packets_total", "counter", "Super-packets (TSO/USO) read from the TUN device and split.", c.TunSuperPackets);
            One("veil_tun_coalesced_packets_total", "counter", "Packets merged into super-packets written to the TUN device.", c.TunCoalesced);
            Head("veil_offload_enabled", "gauge", "1 when the kernel offload is in use (probed at start; UDP GSO is dropped should the kernel refuse it).");
            foreach (var (name, on) in Offloads()) sb.Append("veil_offload_enabled{offload=\"").Append(name).Append("\"} ").Append(on ? 1 : 0).Append('\n');
            Head("veil_handshakes_total", "counter", "Handshakes by result.");
            sb.Append("veil_handshakes_total{result=\"initiated\"} ").Append(c.HandshakesInitiated).Append('\n');
            sb.Append("veil_handshakes_total{result=\"completed\"} ").Append(c.HandshakesCompleted).Append('\n');
            One("veil_cookies_sent_total", "counter", "Cookie replies sent while under load.", c.CookiesSent);
            One("veil_hellos_repeated_total", "counter", "ClientHellos retransmitted unchanged.", c.HellosRepeated);
            One("veil_answers_repeated_total", "counter", "ServerHellos sent again to a repeated ClientHello.", c.AnswersRepeated);
            Head("veil_packets_dropped_total", "counter", "Packets dropped, by reason.");
            for (int i = 0; i < (int)DropReason.Count; i++)
                sb.Append("veil_packets_dropped_total{reason=\"").Append(Counters.DropName((DropReason)i)).Append("\"} ").Append(c.Drops[i]).Append('\n');
            Admission a = node.Admission;
            Head("veil_admission_refused_total", "counter", "ClientHellos refused or made to prove their address, by rule.");
            sb.Append("veil_admission_refused_total{reason=\"rate_source\"} ").Append(a.RefusedSource).Append('\n');
            sb.Append("veil_admission_refused_total{reason=\"rate_global\"} ").Append(a.RefusedGlobal).Append('\n');
            sb.Append("veil_admission_refused_total{reason=\"cookie_budget\"} ").Append(a.RefusedCookies).Append('\n');
            sb.Append("veil_admission_refused_total{reason=\"max_sessions\"} ").Append(a.RefusedSessions).Append('\n');
            Mesh m = node.Mesh;
            One("veil_mesh_exchange_sent_bytes_total", "counter", "Bytes of peer-exchange messages sent.", m.SentBytes);
            One("veil_mesh_exchange_rejected_total", "counter", "Peer-exchange messages dropped as malformed or oversized.", m.Rejected);
            One("veil_mesh_claims_refused_total", "counter", "Claims refused by the claim policy.", m.ClaimsRefused);
            One("veil_mesh_routes", "gauge", "Prefixes in the route table.", node.RouteList.Count);
            One("veil_mesh_revocations", "gauge", "Revoked member keys this node refuses.", m.RevocationCount);
            One("veil_mesh_isolated_by_members", "gauge", "Keys other members mark isolated, whose sessions this node refuses.", m.BarredCount);
            One("veil_fec_parity_sent_total", "counter", "Parity records sent on lossy paths.", node.FecParitySent);
            One("veil_fec_parity_bytes_total", "counter", "Bytes of parity records sent (on the wire, as records).", node.FecParityBytes);
            One("veil_fec_recovered_total", "counter", "Data records rebuilt from parity.", node.FecRecovered);
            One("veil_fec_unrecoverable_total", "counter", "Parity records that came with more members missing than the group has rows.", node.FecUnrecoverable);
            if (node.Mode != L2Mode.Tun)
            {
                One("veil_mac_table_entries", "gauge", "MAC addresses learned from peers (--mode tap|hub), idle ones included until swept.", node.Macs.Count);
                One("veil_mac_moves_total", "counter", "MAC addresses that moved from one peer to another.", node.Macs.Moves);
                Head("veil_frames_total", "counter", "Frames from the TAP, by how they were sent: to one peer, or flooded (unknown: unicast to a MAC not learned).");
                sb.Append("veil_frames_total{kind=\"switched\"} ").Append(node.FramesSwitched).Append('\n');
                sb.Append("veil_frames_total{kind=\"flooded\"} ").Append(node.FramesFlooded).Append('\n');
                sb.Append("veil_frames_total{kind=\"unknown\"} ").Append(node.FramesUnknown).Append('\n');
            }
            Relays r = node.Relays;
            One("veil_relay_bytes_total", "counter", "Bytes of inner datagrams this node carried between other members.", r.Bytes);
            One("veil_relay_records_total", "counter", "Datagrams this node carried between other members.", r.Records);
            One("veil_relay_refused_total", "counter", "Relay requests refused (not offered, unknown member, malformed, table full).", r.Refused);
            One("veil_relay_rate_limited_total", "counter", "Relayed datagrams dropped over their pair's byte budget.", r.RateLimited);
            One("veil_relay_refusals_told_total", "counter", "Hellos this node would not carry whose senders it told so.", r.RefusalsTold);
            One("veil_relay_refusals_heard_total", "counter", "Hellos a relay would not carry that this node then sent directly.", r.RefusalsHeard);
            One("veil_relay_flows", "gauge", "Pair directions this node relays for.", r.Pairs);
            if (Mapper?.Current is PortMapper.State pm)
            {
                Head("veil_port_mapping_active", "gauge", "1 when the gateway forwards our port, by protocol.");
                foreach (string proto in (ReadOnlySpan<string>)["pcp", "nat-pmp", "upnp"])
                    sb.Append("veil_port_mapping_active{protocol=\"").Append(proto).Append("\"} ").Append(pm.Error == null && pm.Protocol == proto ? 1 : 0).Append('\n');
            }
            // A scrape's size and the series count a Prometheus server stores grow with peers; past
            // MaxMetricPeers the node-wide totals above still count every peer.
            var shown = new List<Peer>();
            foreach (Peer p in ActivePeers()) if (shown.Count < MaxMetricPeers) shown.Add(p);
            void PeerSeries(string name, string type, string help, Func<Peer, double> value, Func<Peer, bool>? known = null)
            {
                Head(name, type, help);
                foreach (Peer p in shown)
                {
                    if (known != null && !known(p)) continue;       // no sample yet: no series (not a 0 that graphs as one)
                    sb.Append(name).Append("{peer=");
                    Str(sb, p.Name);
                    sb.Append(",public_key=\"").Append(p.PublicKey.ToBase64()).Append("\"} ")
                      .Append(value(p).ToString(System.Globalization.CultureInfo.InvariantCulture)).Append('\n');
                }
            }
            PeerSeries("veil_peer_received_bytes_total", "counter", "Bytes received from the peer.", p => p.RxBytes);
            PeerSeries("veil_peer_sent_bytes_total", "counter", "Bytes sent to the peer.", p => p.TxBytes);
            PeerSeries("veil_peer_last_handshake_timestamp_seconds", "gauge", "Unix time of the latest handshake (0: never).", p => p.LastHandshakeUnixS);
            PeerSeries("veil_peer_up", "gauge", "1 when the peer has a usable session.", p => p.HasReadySession(nowMs, Spec.RejectAfterTimeMs) ? 1 : 0);
            PeerSeries("veil_peer_relayed", "gauge", "1 when records to the peer go through a relaying member.", p => p.Relay != null ? 1 : 0);
            PeerSeries("veil_peer_relayed_bytes_total", "counter", "Bytes of the peer's records that came or went through a relay.", p => p.RelayedRxBytes + p.RelayedTxBytes);
            PeerSeries("veil_peer_punches_sent_total", "counter", "Punch rounds sent towards the peer while relayed.", p => p.PunchesSent);
            PeerSeries("veil_peer_rtt_seconds", "gauge", "Round trip of the latest handshake with the peer.", p => p.RttUs / 1e6, p => p.RttUs >= 0);
            PeerSeries("veil_peer_endpoint_changes_total", "counter", "Times the peer's endpoint moved (roaming, NAT rebinding).", p => p.EndpointChanges);
            Head("veil_gc_collections_total", "counter", "Garbage collections by generation.");
            for (int g = 0; g <= 2; g++) sb.Append("veil_gc_collections_total{generation=\"").Append(g).Append("\"} ").Append(GC.CollectionCount(g)).Append('\n');
            One("veil_gc_allocated_bytes_total", "counter", "Bytes allocated on the managed heap.", GC.GetTotalAllocatedBytes());
            One("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss);
            One("process_cpu_seconds_total", "counter", "User and system CPU time in seconds.", cpuS);
            One("process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch in seconds.", _startedUnixS);
            return sb.ToString();
        }
    }
}

/// <summary>One request and one reply per connection, served by the loop that also carries the
/// packets, so nothing here may block: every connection is a small state machine with a bounded
/// request buffer and a deadline for reading the request and then for writing the reply; when the
/// table is full, the client that has been sending its request the longest makes room (idle
/// clients cannot keep the endpoint closed; ones being answered are left alone). A slow, silent or
/// huge client costs one slot, never the loop. Subclasses listen, admit and answer.</summary>
// Lifecycle of a Conn: reading (deadline: read timeout) -> Waiting for a Later answer (LaterTimeoutMs)
// or straight to writing (Out set, deadline: write timeout) -> closed, its buffer back on _spare.
internal abstract unsafe class RequestServer : IDisposable
{
    protected sealed class Conn(int maxRequestLen)
    {
        internal readonly byte[] In = new byte[maxRequestLen];
        internal int InLen;
        internal byte[]? Out;
        internal int OutOff;
        internal long DeadlineMs;
        internal bool Waiting;                   // the request is complete; its answer comes from elsewhere (Later)
        internal int Generation;                 // counts reuses, so a late answer never reaches the next client
    }

    private const long LaterTimeoutMs = 9_000;  // within `veil`'s own 10 s wait for an answer

    private int _fd;
    private readonly int _epfd, _maxConnections, _maxRequestLen;
    private readonly long _readTimeoutMs, _writeTimeoutMs;
    private readonly Dictionary<int, Conn> _conns = new();
    private readonly Stack<Conn> _spare = new();                 // request buffers of closed clients, reused
    internal int Fd => _fd;

    protected RequestServer(int fd, int epfd, int maxConnections, int maxRequestLen, long readTimeoutMs, long writeTimeoutMs)
    {
        _fd = fd;
        _epfd = epfd;
        _maxConnections = maxConnections;
        _maxRequestLen = maxRequestLen;
        _readTimeoutMs = readTimeoutMs;
        _writeTimeoutMs = writeTimeoutMs;
    }

    /// <summary>Answers (calls Respond) once the request in c.In is complete; false while it is not.</summary>
    protected abstract bool TryAnswer(int fd, Conn c, long nowMs, StatusView status);
    protected abstract byte[] TooLong();
    protected abstract byte[] TimedOut();
    /// <summary>The reply to a client whose answer (Later) did not come in time.</summary>
    protected virtual byte[] TooLate() => TimedOut();
    /// <summary>Turns a new client away, by a Respond, when it may not ask.</summary>
    protected virtual void Admit(int fd, Conn c, ReadOnlySpan<byte> peer, long nowMs) { }
    /// <summary>The reply to a client that ends its side before the request is complete (null: none).</summary>
    protected virtual byte[]? Unfinished() => null;
    protected virtual void Closed() { }

    internal bool Owns(int fd) => fd == _fd || _conns.ContainsKey(fd);

    // The loop sleeps no longer than this, so a silent client is timed out on time without a tick.
    // Asked on every wake-up of the loop, packets' too: with no client it touches nothing else.
    internal long NextDeadlineMs
    {
        get
        {
            if (_conns.Count == 0) return long.MaxValue;
            long next = long.MaxValue;
            foreach (Conn c in _conns.Values) next = Math.Min(next, c.DeadlineMs);
            return next;
        }
    }

    internal void OnReady(int fd, long nowMs, StatusView status)
    {
        if (fd == _fd) { Accept(nowMs); return; }
        if (!_conns.TryGetValue(fd, out Conn? c)) return;
        if (c.Out != null) { Flush(fd, c); return; }
        if (c.Waiting) { DiscardInput(fd); return; }
        nint n;
        fixed (byte* p = &c.In[c.InLen]) n = Libc.Read(fd, p, (nuint)(_maxRequestLen - c.InLen));
        if (n < 0 && Libc.Errno is Libc.EAGAIN or Libc.EINTR) return;
        // A client that shut down its sending side with half a request may still read an error reply.
        if (n == 0 && c.InLen > 0 && Unfinished() is byte[] why) { Respond(fd, c, why, nowMs); return; }
        if (n <= 0) { Close(fd); return; }
        c.InLen += (int)n;
        // A full buffer without a complete request is refused: the request must fit, it is never grown.
        if (!TryAnswer(fd, c, nowMs, status) && c.InLen == _maxRequestLen) Respond(fd, c, TooLong(), nowMs);
    }

    private void Accept(long nowMs)
    {
        Span<byte> sa = stackalloc byte[Libc.SockaddrUnLen];
        // At most a table's worth of accepts per wake-up, so a connect flood cannot keep the loop here;
        // the rest wait in the listen backlog for the next readiness.
        for (int i = 0; i < _maxConnections; i++)
        {
            int alen = sa.Length;
            int fd;
            fixed (byte* p = sa) fd = Libc.Accept4(_fd, p, &alen, Libc.SOCK_NONBLOCK | Libc.SOCK_CLOEXEC);
            if (fd < 0) return;
            if (_conns.Count >= _maxConnections && !EvictSlowest()) { Libc.Close(fd); continue; }
            Conn c = _spare.Count > 0 ? _spare.Pop() : new Conn(_maxRequestLen);
            c.DeadlineMs = nowMs + _readTimeoutMs;
            _conns[fd] = c;
            Libc.EpollAdd(_epfd, fd);
            // accept4 reports the full address length even when it truncated the address; clamp before slicing.
            Admit(fd, c, sa[..Math.Clamp(alen, 0, sa.Length)], nowMs);
        }
    }

    // Only clients still sending (Out == null) may be evicted; the one with the oldest deadline has had
    // the most time. A client being answered has its reply and will be gone soon anyway.
    private bool EvictSlowest()
    {
        int victim = -1;
        long oldest = long.MaxValue;
        foreach (var (fd, c) in _conns)
            if (c.Out == null && c.DeadlineMs < oldest) { oldest = c.DeadlineMs; victim = fd; }
        if (victim < 0) return false;
        Close(victim);
        return true;
    }

    /// <summary>Leaves the client waiting for an answer made elsewhere; the action (called on this
    /// loop's thread) sends it, unless the client is gone or timed out by then.</summary>
    protected Action<byte[]> Later(int fd, Conn c, long nowMs)
    {
        c.Waiting = true;
        c.DeadlineMs = nowMs + LaterTimeoutMs;
        // The fd number and the Conn object are both reused once this client closes; the generation tells
        // a late answer for this client from one for whoever holds the slot now.
        int generation = c.Generation;
        return reply =>
        {
            if (_conns.TryGetValue(fd, out Conn? now) && now == c && c.Generation == generation && c.Out == null)
                Respond(fd, c, reply, Mono.NowMs());
        };
    }

    // A waiting client that writes more is ignored; one that hangs up is closed.
    private void DiscardInput(int fd)
    {
        Span<byte> sink = stackalloc byte[256];
        nint n;
        fixed (byte* p = sink) n = Libc.Read(fd, p, (nuint)sink.Length);
        if (n == 0 || n < 0 && Libc.Errno is not (Libc.EAGAIN or Libc.EINTR)) Close(fd);
    }

    protected void Respond(int fd, Conn c, byte[] reply, long nowMs)
    {
        c.Out = reply;
        c.DeadlineMs = nowMs + _writeTimeoutMs;
        Flush(fd, c);
    }

    private void Flush(int fd, Conn c)
    {
        while (c.OutOff < c.Out!.Length)
        {
            nint n;
            fixed (byte* p = &c.Out[c.OutOff]) n = Libc.Write(fd, p, (nuint)(c.Out.Length - c.OutOff));
            // The socket is full: wait for EPOLLOUT rather than spin; the write deadline still bounds the client.
            if (n < 0 && Libc.Errno == Libc.EAGAIN) { Libc.EpollMod(_epfd, fd, Libc.EPOLLOUT); return; }
            if (n <= 0) break;
            c.OutOff += (int)n;
        }
        Close(fd);
    }

    /// <summary>Ends connections past their deadline; a request not complete in time gets TimedOut().</summary>
    internal void Expire(long nowMs)
    {
        List<int>? late = null;
        foreach (var (fd, c) in _conns)
            if (nowMs >= c.DeadlineMs) (late ??= new()).Add(fd);
        if (late == null) return;
        foreach (int fd in late)
        {
            Conn c = _conns[fd];
            // The error reply gets one write: whatever the socket does not take at once goes with the connection.
            if (c.Out == null) Respond(fd, c, c.Waiting ? TooLate() : TimedOut(), nowMs);
            if (_conns.ContainsKey(fd)) Close(fd);
        }
    }

    private void Close(int fd)
    {
        Libc.EpollCtl(_epfd, Libc.EPOLL_CTL_DEL, fd, null);
        Libc.Close(fd);
        // No more spares than slots: a burst of clients leaves at most one table of buffers behind.
        if (!_conns.Remove(fd, out Conn? c) || _spare.Count >= _maxConnections) return;
        c.In.AsSpan(0, c.InLen).Clear();                          // a request is nobody else's business
        c.InLen = 0;
        c.Out = null;
        c.OutOff = 0;
        c.Waiting = false;
        c.Generation++;
        _spare.Push(c);
    }

    public void Dispose()
    {
        foreach (int fd in new List<int>(_conns.Keys)) Close(fd);
        if (_fd < 0) return;
        Libc.Close(_fd);
        _fd = -1;
        Closed();
    }
}

internal sealed unsafe class ControlServer : RequestServer
{
    private const int MaxClients = 8;
    // A local client writes its one line at once; two seconds only ever run out for a stuck one.
    private const long ControlTimeoutMs = 2_000;
    private readonly string _path;
    private readonly Daemon _daemon;

    private ControlServer(int fd, int epfd, string path, Daemon daemon)
        : base(fd, epfd, MaxClients, Tune.MaxControlRequestLen, ControlTimeoutMs, ControlTimeoutMs)
    {
        _path = path;
        _daemon = daemon;
    }

    internal static ControlServer Listen(string path, int epfd, Daemon daemon)
    {
        int fd = Bind(path);
        Libc.EpollAdd(epfd, fd);
        return new ControlServer(fd, epfd, path, daemon);
    }

    /// <summary>A listening control socket at path, for its owner alone.</summary>
    internal static int Bind(string path)
    {
        int fd = Libc.Socket(Libc.AF_UNIX, Libc.SOCK_STREAM | Libc.SOCK_NONBLOCK | Libc.SOCK_CLOEXEC, 0);
        if (fd < 0) throw new IOException($"cannot create control socket: {Libc.ErrorText(Libc.Errno)}");
        // A socket file left by a crashed daemon is removed; a live daemon on it is not disturbed.
        if (File.Exists(path) && ControlClient.TryConnect(path) is int live)
        {
            Libc.Close(live);
            Libc.Close(fd);
            throw new IOException($"control socket {path} is in use by a running daemon (use --control PATH)");
        }
        // bind() fails with EADDRINUSE on an existing file, even a dead socket's, so it goes first.
        try { File.Delete(path); } catch (IOException) { } catch (UnauthorizedAccessException) { }
        Span<byte> sa = stackalloc byte[Libc.SockaddrUnLen];
        int len = Libc.WriteSockaddrUn(path, sa);
        fixed (byte* p = sa)
        {
            if (Libc.Bind(fd, p, len) < 0 || Libc.Listen(fd, 8) < 0)
            {
                int e = Libc.Errno;
                Libc.Close(fd);
                throw new IOException($"cannot listen on control socket {path}: {Libc.ErrorText(e)}");
            }
        }
        // The socket steers the node (reload, down, revoke): only its owner may connect. Privileges.Drop
        // later hands the file to --user so the unprivileged daemon can still remove it at exit.
        File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        return fd;
    }

    private const string NoInvites = "error: this daemon runs without --config, so it has no invites\n";

    protected override bool TryAnswer(int fd, Conn c, long nowMs, StatusView status)
    {
        int nl = Array.IndexOf(c.In, (byte)'\n', 0, c.InLen);
        if (nl < 0) return false;
        // Trim also takes the '\r' of a client that ends its line with CRLF (socat, nc -C).
        string line = Encoding.UTF8.GetString(c.In, 0, nl).Trim();
        // Reload and ping answer later: the config is parsed on the chores thread, and a ping waits for the
        // peer. Revoke checks the admin's signature off the node's lock and takes the lock itself.
        if (line.StartsWith("network ", StringComparison.Ordinal))
        {
            Respond(fd, c, "error: this daemon runs one network: --network goes with a config of [[network]] tables\n"u8.ToArray(), nowMs);
            return true;
        }
        if (line == "reload")
        {
            Action<byte[]> answer = Later(fd, c, nowMs);
            _daemon.AskReload("control", (code, message) => answer(Encoding.UTF8.GetBytes(ReloadReply(code, message))));
            return true;
        }
        // A rollback writes the whole file back, the other networks' tables too.
        if (_daemon.Hosted && (line == "confirm" || line.StartsWith("reload confirm ", StringComparison.Ordinal)))
        {
            Respond(fd, c, "error: reload --confirm rolls back the whole file, so it runs with one network only\n"u8.ToArray(), nowMs);
            return true;
        }
        if (line.StartsWith("reload confirm ", StringComparison.Ordinal))
        {
            if (!int.TryParse(line["reload confirm ".Length..], System.Globalization.NumberStyles.None, null, out int seconds) || seconds is < 10 or > 3600)
            {
                Respond(fd, c, "error: reload --confirm takes 10 to 3600 seconds\n"u8.ToArray(), nowMs);
                return true;
            }
            Action<byte[]> answer = Later(fd, c, nowMs);
            _daemon.AskReloadConfirmed(seconds * 1000L, (code, message) => answer(Encoding.UTF8.GetBytes(ReloadReply(code, message))));
            return true;
        }
        if (line.StartsWith("ping ", StringComparison.Ordinal))
        {
            _daemon.Ping(line, Later(fd, c, nowMs));
            return true;
        }
        if (line.StartsWith("revoke ", StringComparison.Ordinal))
        {
            Respond(fd, c, Encoding.UTF8.GetBytes(_daemon.Revoke(line)), nowMs);
            return true;
        }
        if (line.StartsWith("set exit-node ", StringComparison.Ordinal))
        {
            Action<byte[]> answer = Later(fd, c, nowMs);
            _daemon.SetExitNode(line["set exit-node ".Length..], text => answer(Encoding.UTF8.GetBytes(text)));
            return true;
        }
        string reply;
        lock (status.Gate)
            reply = line switch
            {
                "status" => status.Text(),
                "status json" => status.Json(),
                "status short" => status.Short(),
                "status dump" => status.Dump(),
                "health" => status.Health(),
                "peers" => status.PeersText(),
                "peers json" => status.PeersJson(),
                "routes" => status.RoutesText(),
                "routes json" => status.RoutesJson(),
                "netcheck" => status.Netcheck(),
                "down" => "ok: leaving\n",
                "confirm" => _daemon.Confirm(),
                _ when line.StartsWith("invite ", StringComparison.Ordinal) => _daemon.Invite(line),
                "invites" => _daemon.Invites?.List(DateTimeOffset.UtcNow.ToUnixTimeSeconds()) ?? NoInvites,
                _ when line.StartsWith("invites revoke ", StringComparison.Ordinal) => _daemon.Invites?.Revoke(line["invites revoke ".Length..]) ?? NoInvites,
                _ => "error: unknown request (expected status [json|short|dump], peers, routes [json], health, netcheck, ping PEER, reload [confirm SECONDS], confirm, down, invite, invites [revoke ID] or revoke)\n",
            };
        Respond(fd, c, Encoding.UTF8.GetBytes(reply), nowMs);
        if (line.StartsWith("invite", StringComparison.Ordinal) && _daemon.Invites != null) _daemon.SaveInvites();
        // Stop after the reply is written, so `veil down` reads "ok" before the loop winds down.
        if (line == "down") _daemon.RequestStop();
        return true;
    }

    protected override byte[] TooLong() => "error: request too long or not a line\n"u8.ToArray();
    protected override byte[]? Unfinished() => TooLong();
    protected override byte[] TimedOut() => "error: no complete request line in time\n"u8.ToArray();

    private static string ReloadReply(Daemon.ReloadCode code, string message) => code switch
    {
        Daemon.ReloadCode.Ok => "ok: " + message + "\n",
        Daemon.ReloadCode.NeedsRestart => "restart: " + message + "\n",
        _ => "error: " + message + "\n",
    };

    protected override byte[] TooLate() => "error: no answer in time; the daemon's log tells how the request ended\n"u8.ToArray();

    protected override void Closed()
    {
        try { File.Delete(_path); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}

/// <summary>The CLI side of the control socket, plus small blocking-socket helpers both sides use.</summary>
internal static unsafe class ControlClient
{
    // asm-generic/socket.h values (x86, arm, arm64, riscv), with a struct timeval of two C longs.
    private const int SO_RCVTIMEO = 20, SO_SNDTIMEO = 21;

    internal static int? TryConnect(string path)
    {
        int fd = Libc.Socket(Libc.AF_UNIX, Libc.SOCK_STREAM | Libc.SOCK_CLOEXEC, 0);
        if (fd < 0) return null;
        Span<byte> sa = stackalloc byte[Libc.SockaddrUnLen];
        int len = Libc.WriteSockaddrUn(path, sa);
        fixed (byte* p = sa)
            if (Libc.Connect(fd, p, len) < 0) { Libc.Close(fd); return null; }
        return fd;
    }

    internal static void SetTimeouts(int fd, int ms)
    {
        nint* tv = stackalloc nint[2];               // struct timeval: tv_sec, tv_usec (both long)
        tv[0] = ms / 1000;
        tv[1] = ms % 1000 * 1000;
        Libc.SetSockOpt(fd, Libc.SOL_SOCKET, SO_RCVTIMEO, tv, 2 * sizeof(nint));
        Libc.SetSockOpt(fd, Libc.SOL_SOCKET, SO_SNDTIMEO, tv, 2 * sizeof(nint));
    }

    // Gives up on the first error: ReadAll then gets nothing and the caller reports no answer.
    internal static void WriteAll(int fd, string text)
    {
        byte[] b = Encoding.UTF8.GetBytes(text);
        int off = 0;
        while (off < b.Length)
        {
            nint n;
            fixed (byte* p = &b[off]) n = Libc.Write(fd, p, (nuint)(b.Length - off));
            if (n <= 0) return;
            off += (int)n;
        }
    }

    // The server closes after its one reply, so end of file is the end of the answer; a receive
    // timeout ends it too, with what arrived so far.
    internal static string ReadAll(int fd)
    {
        var ms = new MemoryStream();
        byte[] buf = new byte[4096];
        while (true)
        {
            nint n;
            fixed (byte* p = buf) n = Libc.Read(fd, p, (nuint)buf.Length);
            if (n <= 0) break;
            ms.Write(buf, 0, (int)n);
        }
        return Encoding.UTF8.GetString(ms.ToArray());
    }

    /// <summary>Sends one request and returns the reply, or null when no daemon answers in time.</summary>
    internal static string? Ask(string path, string request, int timeoutMs = 10_000)
    {
        if (TryConnect(path) is not int fd) return null;
        try
        {
            SetTimeouts(fd, timeoutMs);
            WriteAll(fd, request + "\n");
            return ReadAll(fd);
        }
        finally { Libc.Close(fd); }
    }
}

/// <summary>The management HTTP endpoint: GET /status, /metrics, /healthz; sources outside
/// --mgmt-acl get 403.</summary>
internal sealed unsafe class MgmtServer : RequestServer
{
    private const int MaxConnections = 16, MaxHeaderLen = 8192;
    // Writing may take longer than asking: /metrics with many peers runs to hundreds of KiB.
    private const long ReadTimeoutMs = 2_000, WriteTimeoutMs = 5_000;
    private List<IpPrefix> _acl;
    internal int Port { get; }

    private MgmtServer(int fd, int epfd, int port, List<IpPrefix> acl)
        : base(fd, epfd, MaxConnections, MaxHeaderLen, ReadTimeoutMs, WriteTimeoutMs)
    {
        Port = port;
        _acl = acl;
    }

    internal static MgmtServer Listen(IPAddress address, int port, int epfd, List<IpPrefix> acl)
    {
        (int fd, port) = Libc.ListenTcp(address, port, 16, "serve management HTTP", " (use --mgmt ADDR:PORT or --mgmt off)");
        Libc.EpollAdd(epfd, fd);
        return new MgmtServer(fd, epfd, port, acl);
    }

    internal void SetAcl(List<IpPrefix> acl) => _acl = acl;

    internal long HealthzGraceMs = 120_000;       // from --healthz-grace; the loop sets it at start and reload
    internal Host? Networks;                      // a node of several networks answers for all of them

    internal bool Allowed(in Endpoint from)
    {
        Span<byte> a = stackalloc byte[16];
        from.WriteAddress16(a);
        // The socket is dual-stack: an IPv4 client arrives as ::ffff:a.b.c.d and must match 127.0.0.0/8.
        ReadOnlySpan<byte> addr = from.IsV4 ? a[12..] : a;
        foreach (IpPrefix p in _acl)
            if (p.Contains(addr)) return true;
        return false;
    }

    protected override void Admit(int fd, Conn c, ReadOnlySpan<byte> peer, long nowMs)
    {
        // An address that cannot be read is refused too: the ACL fails closed.
        if (!Libc.TryReadSockaddr(peer, peer.Length, out Endpoint from) || !Allowed(from))
            Respond(fd, c, Http(403, "text/plain", "forbidden: not in --mgmt-acl\n"), nowMs);
    }

    protected override bool TryAnswer(int fd, Conn c, long nowMs, StatusView status)
    {
        // Only the request line is used; headers are read (and bounded) only to find their end, and a
        // body, which no GET has, is never read.
        int end = c.In.AsSpan(0, c.InLen).IndexOf("\r\n\r\n"u8);
        if (end < 0) return false;
        string head = Encoding.ASCII.GetString(c.In, 0, end);
        int eol = head.IndexOf('\r');
        string[] parts = (eol < 0 ? head : head[..eol]).Split(' ');
        string path = parts.Length == 3 ? parts[1] : "";
        int q = path.IndexOf('?');
        if (q >= 0) path = path[..q];
        bool valid = parts.Length == 3 && parts[2].StartsWith("HTTP/1.");
        byte[] reply =
            !valid ? Http(400, "text/plain", "bad request\n")
            : parts[0] != "GET" && parts[0] != "HEAD" ? Http(405, "text/plain", "only GET\n")
            : Networks != null ? HostAnswer(path)
            : path switch
            {
                "/status" => Http(200, "application/json", StatusJson(status)),
                "/metrics" => Http(200, "text/plain; version=0.0.4; charset=utf-8", status.Metrics()),
                "/healthz" => Healthz(status) is string why ? Http(503, "text/plain", "unhealthy: " + why + "\n") : Http(200, "text/plain", "ok\n"),
                "/" => Http(200, "text/html; charset=utf-8", StatusPage, StatusPageHeaders),
                _ => Http(404, "text/plain", "not found (try /, /status, /metrics, /healthz)\n"),
            };
        // HEAD: the same head (its Content-Length included), no body (RFC 9110 §9.3.2).
        if (valid && parts[0] == "HEAD") reply = reply.AsSpan(0, reply.AsSpan().IndexOf("\r\n\r\n"u8) + 4).ToArray();
        Respond(fd, c, reply, nowMs);
        return true;
    }

    private static string StatusJson(StatusView status) { lock (status.Gate) return status.Json(); }

    // Several networks: /status holds each network's status under its name, /metrics every sample with
    // its network label, /healthz is unhealthy while any network is. (The status page draws one.)
    private byte[] HostAnswer(string path)
    {
        List<(string Name, StatusView View)> views = Networks!.Views();
        switch (path)
        {
            case "/status":
                var sb = new StringBuilder("{\"networks\":{");
                for (int i = 0; i < views.Count; i++)
                {
                    if (i > 0) sb.Append(',');
                    JsonText.Str(sb, views[i].Name);
                    sb.Append(':').Append(StatusJson(views[i].View).TrimEnd());
                }
                return Http(200, "application/json", sb.Append("}}\n").ToString());
            case "/metrics":
                return Http(200, "text/plain; version=0.0.4; charset=utf-8", Host.MergeMetrics(views.ConvertAll(v => (v.Name, v.View.Metrics()))));
            case "/healthz":
                var why = new List<string>();
                foreach (var (name, view) in views)
                    if (Healthz(view) is string w) why.Add(name + ": " + w);
                return why.Count > 0 ? Http(503, "text/plain", "unhealthy: " + string.Join("; ", why) + "\n") : Http(200, "text/plain", "ok\n");
            default:
                return Http(404, "text/plain", "not found (this node runs several networks: /status, /metrics, /healthz)\n");
        }
    }

    // A watchdog (procd, systemd, Kubernetes) restarts or alerts on 503: only after the grace time,
    // so a node that is starting or riding out a short outage is not flapped.
    private string? Healthz(StatusView status) { lock (status.Gate) return status.Unhealthy(HealthzGraceMs); }

    protected override byte[] TooLong() => Http(431, "text/plain", "request header too large\n");
    protected override byte[] TimedOut() => Http(408, "text/plain", "request timeout\n");

    // GET /: a status page for a browser (tests/netns/statuspage.sh). It polls /status and draws
    // with its one inline script and style; the CSP admits those two by hash, computed here from
    // the text served so the two cannot drift, and nothing else (no other origin, no inline handler).
    private static readonly string StatusPage = """
    <!DOCTYPE html>
    <html lang="en">
    <head>
    <meta charset="utf-8">
    <meta name="viewport" content="width=device-width,initial-scale=1">
    <link rel="icon" href="data:,">
    <title>veil status</title>
    <style>
    :root{--bg:#fff;--fg:#1b1f24;--mute:#667;--line:#dde;--rx:#1a7f37;--tx:#0860c9;--bad:#c62828;color-scheme:light dark}
    @media (prefers-color-scheme:dark){:root{--bg:#111418;--fg:#e4e6ea;--mute:#99a;--line:#2c3038;--rx:#4ac26b;--tx:#58a6ff;--bad:#ff6b6b}}
    body{margin:auto;max-width:70em;padding:1em;background:var(--bg);color:var(--fg);font:14px/1.4 system-ui,sans-serif}
    h1{font-size:1.3em;margin:0 0 .5em}h2{font-size:1.05em;margin:1.2em 0 .4em}
    #ver,.mute{color:var(--mute);font-weight:normal}
    #err{color:var(--bad);font-weight:bold}
    dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em;margin:0}
    dt{color:var(--mute)}dd{margin:0}
    code,.mono{font-family:ui-monospace,monospace;word-break:break-all}
    table{border-collapse:collapse;width:100%}
    th,td{text-align:left;padding:.3em .6em;border-bottom:1px solid var(--line);white-space:nowrap}
    th{color:var(--mute)}
    .up{color:var(--rx);font-weight:600}.down{color:var(--bad)}
    canvas{width:100%;height:140px;border:1px solid var(--line)}
    .rx{color:var(--rx)}.tx{color:var(--tx)}
    </style>
    </head>
    <body>
    <h1>veil <span id="ver"></span></h1>
    <p id="err" hidden></p>
    <h2>Node</h2>
    <dl>
    <dt>public key</dt><dd><code id="key"></code></dd>
    <dt>tun</dt><dd id="tun"></dd>
    <dt>addresses</dt><dd id="addr"></dd>
    <dt>listen port</dt><dd id="port"></dd>
    <dt>uptime</dt><dd id="up"></dd>
    </dl>
    <h2>Traffic <span class="mute">(last 2 min)</span> <span class="rx" id="rxr"></span> <span class="tx" id="txr"></span></h2>
    <canvas id="chart"></canvas>
    <h2>Peers <span class="mute" id="np"></span></h2>
    <table>
    <thead><tr><th>name</th><th>state</th><th>path</th><th>endpoint</th><th>RTT</th><th>rx</th><th>tx</th><th>handshake</th></tr></thead>
    <tbody id="peers"></tbody>
    </table>
    <script>
    "use strict";
    const $ = id => document.getElementById(id), DASH = "\u2013", N = 60;
    const rows = new Map(), hist = [];
    let last = null;
    function iec(n) {
    	const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    	let i = 0;
    	n = Number(n) || 0;
    	while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    	return (i ? n.toFixed(n < 10 ? 2 : 1) : n) + " " + u[i];
    }
    function dur(s) {
    	s = Math.floor(s);
    	const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
    	return d ? d + "d " + h + "h" : h ? h + "h " + m + "m" : m ? m + "m " + s % 60 + "s" : s + "s";
    }
    const age = s => s == null || s < 0 ? "never" : dur(s) + " ago";
    const rtt = v => typeof v === "number" ? v.toFixed(v < 10 ? 2 : 1) + " ms" : DASH;
    function row(key) {
    	let tr = rows.get(key);
    	if (!tr) {
    		tr = document.createElement("tr");
    		for (const c of ["name", "state", "path", "endpoint mono", "rtt", "rx", "tx", "hs"]) {
    			const td = document.createElement("td");
    			td.className = c;
    			tr.appendChild(td);
    		}
    		rows.set(key, tr);
    	}
    	return tr;
    }
    function peers(list) {
    	const body = $("peers"), seen = new Set();
    	for (const p of list) {
    		const k = p.public_key || p.name, tr = row(k), c = tr.cells;
    		seen.add(k);
    		c[0].textContent = p.name;
    		c[0].title = p.public_key;
    		c[1].textContent = p.state;
    		c[1].className = "state " + (p.state === "up" ? "up" : p.state === "down" ? "down" : "mute");
    		c[2].textContent = p.path;
    		c[3].textContent = p.endpoint || DASH;
    		c[4].textContent = rtt(p.rtt_ms);
    		c[5].textContent = iec(p.rx_bytes);
    		c[6].textContent = iec(p.tx_bytes);
    		c[7].textContent = age(p.latest_handshake_s);
    		body.appendChild(tr);
    	}
    	for (const [k, tr] of rows) if (!seen.has(k)) { tr.remove(); rows.delete(k); }
    	$("np").textContent = "(" + list.length + ")";
    }
    function sample(c) {
    	const t = performance.now(), rx = Number(c.rx_bytes) || 0, tx = Number(c.tx_bytes) || 0;
    	if (last && rx >= last.rx && tx >= last.tx && t > last.t) {
    		const dt = (t - last.t) / 1000;
    		hist.push([(rx - last.rx) / dt, (tx - last.tx) / dt]);
    		if (hist.length > N) hist.shift();
    	}
    	last = { t, rx, tx };
    	const h = hist[hist.length - 1];
    	$("rxr").textContent = h ? "rx " + iec(h[0]) + "/s" : "";
    	$("txr").textContent = h ? "tx " + iec(h[1]) + "/s" : "";
    }
    function draw() {
    	const cv = $("chart"), g = cv.getContext("2d"), r = devicePixelRatio || 1;
    	const w = cv.width = cv.clientWidth * r || 1, h = cv.height = cv.clientHeight * r || 1;
    	const css = getComputedStyle(document.documentElement), col = v => css.getPropertyValue(v).trim();
    	const max = Math.max(1024, ...hist.map(s => Math.max(s[0], s[1])));
    	g.strokeStyle = col("--line");
    	g.fillStyle = col("--mute");
    	g.font = 11 * r + "px sans-serif";
    	for (let i = 1; i < 4; i++) { const y = Math.round(h * i / 4) + .5; g.beginPath(); g.moveTo(0, y); g.lineTo(w, y); g.stroke(); }
    	g.fillText(iec(max) + "/s", 4 * r, 12 * r);
    	[["--rx", 0], ["--tx", 1]].forEach(([v, k]) => {
    		g.strokeStyle = col(v);
    		g.lineWidth = 2 * r;
    		g.beginPath();
    		hist.forEach((s, i) => {
    			const x = w - (hist.length - 1 - i) * w / (N - 1), y = h - 2 * r - s[k] / max * (h - 16 * r);
    			i ? g.lineTo(x, y) : g.moveTo(x, y);
    		});
    		g.stroke();
    	});
    }
    function show(s) {
    	const n = s.node || {};
    	$("ver").textContent = s.version ? "v" + s.version : "";
    	$("key").textContent = n.public_key || DASH;
    	$("tun").textContent = (n.tun || DASH) + (n.mtu ? " (mtu " + n.mtu + ")" : "");
    	$("addr").textContent = (n.addresses || []).join(", ") || DASH;
    	$("port").textContent = n.listen_port == null ? DASH : n.listen_port;
    	$("up").textContent = s.uptime_seconds == null ? DASH : dur(s.uptime_seconds);
    	sample(s.counters || {});
    	peers(s.peers || []);
    	draw();
    }
    async function tick() {
    	try {
    		const r = await fetch("/status", { cache: "no-store", signal: AbortSignal.timeout(5000) });
    		if (!r.ok) throw new Error("HTTP " + r.status);
    		show(await r.json());
    		$("err").textContent = "";
    		$("err").hidden = true;
    	} catch (e) {
    		$("err").textContent = "cannot reach /status (" + e.message + "); retrying every 2 s";
    		$("err").hidden = false;
    	}
    	setTimeout(tick, 2000);
    }
    tick();
    </script>
    </body>
    </html>
    """.ReplaceLineEndings("\n");            // as a browser hashes it, whatever line ends the checkout has

    private static readonly string StatusPageHeaders =
        "Content-Security-Policy: " + Csp(StatusPage) + "\r\nX-Content-Type-Options: nosniff\r\n";

    // A CSP hash-source: SHA-256 of an element's exact text between its tags, as UTF-8, in base64.
    internal static string Csp(string page)
    {
        static string Hash(string page, string tag)
        {
            int start = page.IndexOf("<" + tag + ">", StringComparison.Ordinal) + tag.Length + 2;
            int end = page.IndexOf("</" + tag + ">", start, StringComparison.Ordinal);
            return "'sha256-" + Convert.ToBase64String(SHA256.HashData(Encoding.UTF8.GetBytes(page[start..end]))) + "'";
        }
        return $"default-src 'none'; script-src {Hash(page, "script")}; style-src {Hash(page, "style")}; connect-src 'self'; " +
            "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
    }

    private static byte[] Http(int code, string type, string body, string headers = "")
    {
        string reason = code switch
        {
            200 => "OK", 400 => "Bad Request", 403 => "Forbidden", 404 => "Not Found", 405 => "Method Not Allowed",
            408 => "Request Timeout", 431 => "Request Header Fields Too Large", 503 => "Service Unavailable", _ => "Error",
        };
        byte[] b = Encoding.UTF8.GetBytes(body);
        // One request per connection (Connection: close) keeps each client a one-shot state machine; the
        // status is live, so no cache may keep it.
        byte[] h = Encoding.ASCII.GetBytes($"HTTP/1.1 {code} {reason}\r\nContent-Type: {type}\r\nContent-Length: {b.Length}\r\nConnection: close\r\nCache-Control: no-store\r\n{headers}\r\n");
        byte[] all = new byte[h.Length + b.Length];
        h.CopyTo(all, 0);
        b.CopyTo(all, h.Length);
        return all;
    }
}

// ---- 17.1 Several networks in one daemon ------------------------------------------------------
// A file with [[network]] tables runs one Daemon per table, each with its own node, device,
// sockets, loop, control socket (CONTROL.NAME.sock) and log tag: no packet, key, peer or route of
// one is ever in reach of another. The host owns the signals, the node's control socket (a request
// goes to the network it names, or to all of them, each answer kept apart) and the management
// endpoint (one /metrics for all, each sample labelled with its network).

internal sealed unsafe class Host(List<UpConfig> cfgs, string[] args, Log log, Func<string, Log> logOf)
{
    private readonly List<Daemon> _daemons = new();
    private readonly System.Collections.Concurrent.ConcurrentQueue<Action> _answers = new();
    private int _wakeFd = -1, _running;
    private volatile bool _stop;

    internal IReadOnlyList<Daemon> Daemons => _daemons;
    internal string[] Names => cfgs.ConvertAll(c => c.NetworkName!).ToArray();

    internal void Wake()
    {
        ulong one = 1;
        if (_wakeFd >= 0) Libc.Write(_wakeFd, (byte*)&one, 8);
    }

    private void StopAll()
    {
        _stop = true;
        foreach (Daemon d in _daemons) d.RequestStop();
        Wake();
    }

    /// <summary>Called on any thread: the answer is sent from the host's loop.</summary>
    internal void Answer(Action send)
    {
        _answers.Enqueue(send);
        Wake();
    }

    internal int Run()
    {
        UpConfig node = cfgs[0];
        var signals = new List<PosixSignalRegistration>();
        var threads = new List<Thread>();
        int[] codes = new int[cfgs.Count];
        HostControl? control = null;
        MgmtServer? mgmt = null;
        int epfd = -1;
        try
        {
            foreach (PosixSignal sig in new[] { PosixSignal.SIGTERM, PosixSignal.SIGINT })
                signals.Add(PosixSignalRegistration.Create(sig, ctx => { ctx.Cancel = true; StopAll(); }));
            signals.Add(PosixSignalRegistration.Create(PosixSignal.SIGHUP, ctx => { ctx.Cancel = true; foreach (Daemon d in _daemons) d.RequestReload(); }));
            // Every network is opened before any runs: one that cannot start (its port taken) stops
            // them all with its one error, as a single network's would. The exit's mark goes on
            // every network's sockets, so no tunnel's own packets are routed into the exit.
            if (cfgs.Exists(c => c.ExitNode != null)) UdpSocket.FwMark = Gateway.FwMark;
            foreach (UpConfig c in cfgs)
            {
                var d = new Daemon(c, args, logOf(c.NetworkName!));
                _daemons.Add(d);
                try { d.Open(); }
                catch (IOException e) { throw new IOException($"network {c.NetworkName}: {e.Message}"); }
                catch (ConfigException e) { throw new ConfigException($"network {c.NetworkName}: {e.Message}"); }
            }
            _wakeFd = Libc.EventFd(0, Libc.EFD_NONBLOCK | Libc.EFD_CLOEXEC);
            epfd = Libc.EpollCreate1(Libc.EPOLL_CLOEXEC);
            if (_wakeFd < 0 || epfd < 0) throw new IOException($"cannot create the event loop: {Libc.ErrorText(Libc.Errno)}");
            Libc.EpollAdd(epfd, _wakeFd);
            control = HostControl.Listen(node.HostControlPath!, epfd, this);
            if (node.MgmtAddress != null)
            {
                mgmt = MgmtServer.Listen(node.MgmtAddress, node.MgmtPort, epfd, node.MgmtAcl);
                mgmt.HealthzGraceMs = node.HealthzGraceMs;
                mgmt.Networks = this;
            }
            // The drop comes before any network's threads start: capabilities are per thread, and
            // a thread started later inherits what the dropping one kept.
            if (node.User != null) Privileges.Drop(node.User, [node.HostControlPath!, .. _daemons.ConvertAll(d => d.ControlPath)]);
            log.Info("started", $"networks={string.Join(',', Names)} control={node.HostControlPath}" +
                (mgmt != null ? $" mgmt={node.MgmtAddress}:{mgmt.Port}" : "") + (node.User != null ? $" user={node.User}" : ""));
            _running = _daemons.Count;
            for (int i = 0; i < _daemons.Count; i++)
            {
                int k = i;
                var t = new Thread(() => Serve(k, codes)) { IsBackground = true, Name = "veil-net-" + cfgs[k].NetworkName };
                threads.Add(t);
                t.Start();
            }
            Loop(epfd, control, mgmt);
            foreach (Thread t in threads) t.Join();
            int worst = 0;
            foreach (int code in codes) worst = Math.Max(worst, code);
            log.Info("shutdown", $"networks={_daemons.Count} exit={worst}");
            return worst;
        }
        finally
        {
            foreach (PosixSignalRegistration r in signals) r.Dispose();
            StopAll();
            foreach (Thread t in threads) t.Join();
            mgmt?.Dispose();
            control?.Dispose();
            foreach (Daemon d in _daemons) d.Close();
            if (epfd >= 0) Libc.Close(epfd);
            if (_wakeFd >= 0) Libc.Close(_wakeFd);
            _wakeFd = -1;
        }
    }

    // A network that ends by `veil down --network NAME` leaves the others running; one that fails
    // ends them all, so the service manager restarts the node whole.
    private void Serve(int i, int[] codes)
    {
        try { codes[i] = _daemons[i].Serve(); }
        catch (Exception e) when (e is IOException or ConfigException)
        {
            log.Error("network_failed", $"network={cfgs[i].NetworkName} error=\"{e.Message}\"");
            codes[i] = 1;
        }
        finally { _daemons[i].Close(); }                 // its device and sockets go now, not with the last network
        if (codes[i] != 0) StopAll();
        if (Interlocked.Decrement(ref _running) == 0) { _stop = true; Wake(); }
    }

    private void Loop(int epfd, HostControl control, MgmtServer? mgmt)
    {
        byte* events = stackalloc byte[16 * 16];
        while (!_stop || Volatile.Read(ref _running) > 0)
        {
            long nowMs = Mono.NowMs();
            long wake = Math.Min(control.NextDeadlineMs, mgmt?.NextDeadlineMs ?? long.MaxValue);
            int n = Libc.EpollWait(epfd, events, 16, (int)Math.Clamp(wake - nowMs, 0, 1000));
            nowMs = Mono.NowMs();
            for (int i = 0; i < n; i++)
            {
                int fd = Libc.EpollEventFd(events, i);
                if (fd == _wakeFd) { ulong v; Libc.Read(_wakeFd, (byte*)&v, 8); }
                else if (control.Owns(fd)) control.OnReady(fd, nowMs, null!);
                else mgmt?.OnReady(fd, nowMs, null!);
            }
            while (_answers.TryDequeue(out Action? send)) send();
            control.Expire(nowMs);
            mgmt?.Expire(nowMs);
        }
    }

    /// <summary>Each network's view, as "name" and view, for those whose loop runs.</summary>
    internal List<(string Name, StatusView View)> Views()
    {
        var list = new List<(string, StatusView)>();
        for (int i = 0; i < _daemons.Count; i++)
            if (_daemons[i].Status is StatusView v) list.Add((cfgs[i].NetworkName!, v));
        return list;
    }

    /// <summary>One Prometheus text of several: each family once (its HELP and TYPE from the first
    /// network that has it), then every network's samples of it with network="NAME" added.</summary>
    internal static string MergeMetrics(List<(string Name, string Text)> parts)
    {
        var order = new List<string>();
        var heads = new Dictionary<string, StringBuilder>();
        var samples = new Dictionary<string, StringBuilder>();
        var firstOf = new Dictionary<string, string>();
        foreach (var (name, text) in parts)
        {
            string family = "";
            foreach (string line in text.Split('\n'))
            {
                if (line.Length == 0) continue;
                if (line.StartsWith("# ", StringComparison.Ordinal))
                {
                    string[] w = line.Split(' ', 4);
                    if (w.Length < 3) continue;
                    family = w[2];
                    if (!heads.ContainsKey(family)) { order.Add(family); heads[family] = new(); samples[family] = new(); firstOf[family] = name; }
                    if (firstOf[family] == name) heads[family].Append(line).Append('\n');
                    continue;
                }
                int brace = line.IndexOf('{'), space = line.IndexOf(' ');
                if (space < 0) continue;
                if (!samples.ContainsKey(family)) { order.Add(family); heads[family] = new(); samples[family] = new(); firstOf[family] = name; }
                string label = $"network=\"{name}\"";
                samples[family].Append(brace >= 0 && brace < space
                    ? line[..(brace + 1)] + label + (line[brace + 1] == '}' ? "" : ",") + line[(brace + 1)..]
                    : line[..space] + "{" + label + "}" + line[space..]).Append('\n');
            }
        }
        var sb = new StringBuilder();
        foreach (string f in order) sb.Append(heads[f]).Append(samples[f]);
        return sb.ToString();
    }

    /// <summary>Every network's answer to one request as one reply: JSON under "networks", a
    /// health or reload as its worst, the views one after the other under their names.</summary>
    internal static string Combine(string request, string[] names, string?[] replies)
    {
        var sb = new StringBuilder();
        string Of(int i) => replies[i] is { Length: > 0 } r ? r : "error: no answer (the network stopped?)\n";
        if (request.EndsWith(" json", StringComparison.Ordinal))
        {
            sb.Append("{\"networks\":{");
            for (int i = 0; i < names.Length; i++)
            {
                if (i > 0) sb.Append(',');
                JsonText.Str(sb, names[i]);
                string r = Of(i).TrimEnd();
                sb.Append(':').Append(r.StartsWith('{') ? r : "null");
            }
            return sb.Append("}}\n").ToString();
        }
        if (request is "health" or "reload" or "down")
        {
            // The first word is the verdict ("ok:", "down:", "restart:", "error:"); the worst one leads.
            string worst = "ok:";
            for (int i = 0; i < names.Length; i++)
            {
                string verdict = Of(i).Split(' ')[0];
                if (verdict != "ok:" && (worst == "ok:" || verdict == "error:")) worst = verdict;
                sb.Append(i > 0 ? "; " : " ").Append(names[i]).Append(": ").Append(Of(i).Trim());
            }
            return worst + sb.Append('\n').ToString();
        }
        for (int i = 0; i < names.Length; i++)
        {
            if (i > 0) sb.Append('\n');
            sb.Append("network ").Append(names[i]).Append('\n').Append(Of(i));
            if (!Of(i).EndsWith('\n')) sb.Append('\n');
        }
        return sb.ToString();
    }
}

/// <summary>The node's control socket when it runs several networks: "network NAME REQUEST" goes to
/// that network's own socket; a view, health, reload or down without a name goes to all of them.</summary>
internal sealed unsafe class HostControl : RequestServer
{
    private const int MaxClients = 8;
    private const long ControlTimeoutMs = 2_000, NetworkTimeoutMs = 8_500;   // the second within RequestServer's wait
    private readonly string _path;
    private readonly Host _host;

    private HostControl(int fd, int epfd, string path, Host host)
        : base(fd, epfd, MaxClients, Tune.MaxControlRequestLen, ControlTimeoutMs, ControlTimeoutMs) { _path = path; _host = host; }

    internal static HostControl Listen(string path, int epfd, Host host)
    {
        int fd = ControlServer.Bind(path);
        Libc.EpollAdd(epfd, fd);
        return new HostControl(fd, epfd, path, host);
    }

    private static readonly string[] ForAll =
        ["status", "status json", "status short", "status dump", "peers", "peers json", "routes", "routes json", "health", "netcheck", "reload", "down"];

    protected override bool TryAnswer(int fd, Conn c, long nowMs, StatusView status)
    {
        int nl = Array.IndexOf(c.In, (byte)'\n', 0, c.InLen);
        if (nl < 0) return false;
        string line = Encoding.UTF8.GetString(c.In, 0, nl).Trim();
        string[] names = _host.Names;
        if (line == "networks") { Respond(fd, c, Encoding.UTF8.GetBytes(string.Join('\n', names) + "\n"), nowMs); return true; }
        int only = -1;
        if (line.StartsWith("network ", StringComparison.Ordinal))
        {
            string[] w = line.Split(' ', 3);
            only = Array.IndexOf(names, w[1]);
            if (only < 0 || w.Length < 3)
            {
                Respond(fd, c, Encoding.UTF8.GetBytes(only < 0 ? $"error: no network '{w[1]}' here (networks: {string.Join(", ", names)})\n" : "error: network NAME REQUEST\n"), nowMs);
                return true;
            }
            line = w[2];
        }
        else if (Array.IndexOf(ForAll, line) < 0)
        {
            Respond(fd, c, Encoding.UTF8.GetBytes($"error: this node runs several networks ({string.Join(", ", names)}): name one with --network NAME\n"), nowMs);
            return true;
        }
        // Each network answers on its own socket, and a reload or ping takes seconds: asked off the
        // loop, all at once, and answered from the loop (Host.Answer).
        Action<byte[]> answer = Later(fd, c, nowMs);
        string request = line;
        var targets = new List<int>();
        for (int i = 0; i < names.Length; i++)
            if (only < 0 || i == only) targets.Add(i);
        new Thread(() =>
        {
            string?[] replies = new string?[targets.Count];
            var askers = new List<Thread>();
            for (int i = 0; i < targets.Count; i++)
            {
                int k = i;
                var t = new Thread(() => replies[k] = ControlClient.Ask(_host.Daemons[targets[k]].ControlPath, request, (int)NetworkTimeoutMs)) { IsBackground = true };
                askers.Add(t);
                t.Start();
            }
            foreach (Thread t in askers) t.Join();
            string text = only >= 0 ? replies[0] is { Length: > 0 } r ? r : $"error: network '{names[only]}' does not answer (stopped?)\n" : Host.Combine(request, names, replies);
            byte[] bytes = Encoding.UTF8.GetBytes(text);
            _host.Answer(() => answer(bytes));
        }) { IsBackground = true, Name = "veil-ask" }.Start();
        return true;
    }

    protected override byte[] TooLong() => "error: request too long or not a line\n"u8.ToArray();
    protected override byte[]? Unfinished() => TooLong();
    protected override byte[] TimedOut() => "error: no complete request line in time\n"u8.ToArray();
    protected override byte[] TooLate() => "error: no answer in time; the daemon's log tells how the request ended\n"u8.ToArray();

    protected override void Closed()
    {
        try { File.Delete(_path); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}

// ==== 18. CLI ====================================================================================
// The verbs other than `up`: key generation, asking the running daemon, version and help. Each bad
// input is one line on stderr and exit status 2; an unreachable daemon is exit status 1.

internal static class Cli
{
    internal const string Version = "0.1.0";

    // The key is clamped as RFC 7748 §5 says (GeneratePrivateKey), so the file holds the scalar itself.
    // Keys go to stdout and never into argv, where ps and shell history would show them.
    internal static int GenKey(TextWriter stdout)
    {
        Key32 k = default;
        X25519.GeneratePrivateKey(k);
        stdout.WriteLine(k.ToBase64());
        k.Clear();
        return 0;
    }

    /// <summary>As wg does: a secret about to be written to a regular file others may read gets a
    /// warning (the key is still written: the user may fix the mode before anyone looks).</summary>
    internal static void WarnIfOthersCanRead(TextWriter stderr, string stdoutPath = "/proc/self/fd/1")
    {
        try
        {
            var f = new FileInfo(stdoutPath);
            var target = f.ResolveLinkTarget(returnFinalTarget: true) as FileInfo ?? f;
            if (!target.Exists || target.FullName.StartsWith("/dev/", StringComparison.Ordinal)) return;     // a pipe or a terminal
            if ((target.UnixFileMode & (UnixFileMode.GroupRead | UnixFileMode.OtherRead | UnixFileMode.GroupWrite | UnixFileMode.OtherWrite)) != 0)
                stderr.WriteLine($"veil: warning: {target.FullName} can be read by group or others (mode {Convert.ToString((int)target.UnixFileMode, 8)}); run 'umask 077' first, or 'chmod 600 {target.FullName}'");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
    }

    internal static int PubKey(TextReader stdin, TextWriter stdout, TextWriter stderr)
    {
        string? line = stdin.ReadLine();
        if (line == null || !Key32.TryParseBase64(line, out Key32 priv))
        {
            stderr.WriteLine("veil: pubkey reads a base64 private key of 32 bytes on stdin");
            return 2;
        }
        Key32 pub = default;
        X25519.PublicKey(pub, priv);
        priv.Clear();
        stdout.WriteLine(pub.ToBase64());
        return 0;
    }

    internal static int AdminPub(TextReader stdin, TextWriter stdout, TextWriter stderr)
    {
        string? line = stdin.ReadLine();
        byte[]? pub = null;
        try { if (line != null) pub = AdminSignature.PublicKeyOf(Convert.FromBase64String(line.Trim())); }
        catch (FormatException) { }
        if (pub == null)
        {
            stderr.WriteLine("veil: adminpub reads an admin private key (the base64 line 'veil genadmin' prints) on stdin");
            return 2;
        }
        stdout.WriteLine(Convert.ToBase64String(pub));
        return 0;
    }

    // A network secret is any 32 random bytes (Noise's psk); unlike a private key it is not clamped.
    internal static int GenPsk(TextWriter stdout)
    {
        Key32 k = default;
        RandomNumberGenerator.Fill(k);
        stdout.WriteLine(k.ToBase64());
        k.Clear();
        return 0;
    }

    /// <summary>status | down: one request to the daemon's control socket.</summary>
    internal static int Ask(string verb, string[] args, TextWriter stdout, TextWriter stderr)
    {
        string path = Tune.DefaultControlPath, view = "", network = "";
        for (int i = 1; i < args.Length; i++)
        {
            // Only the views have a JSON form; "reload --json" is refused like any other unknown argument.
            if (args[i] == "--json" && verb is "status" or "peers" or "routes" && view.Length == 0) view = " json";
            else if (args[i] is "--short" or "--dump" && verb == "status" && view.Length == 0) view = " " + args[i][2..];
            else if (args[i] == "--confirm" && verb == "reload" && view.Length == 0 && i + 1 < args.Length) view = " confirm " + args[++i];
            else if (args[i] == "exit-node" && verb == "set" && view.Length == 0 && i + 1 < args.Length && !args[i + 1].Contains(' ')) view = " exit-node " + args[++i];
            else if (args[i] == "--control" && i + 1 < args.Length) path = args[++i];
            else if (args[i].StartsWith("--control=")) path = args[i]["--control=".Length..];
            else if (args[i] == "--network" && i + 1 < args.Length && network.Length == 0 && IsNetworkName(args[i + 1])) network = "network " + args[++i] + " ";
            else { stderr.WriteLine($"veil: {verb}: unknown argument '{args[i]}' (see 'veil help {verb}')"); return 2; }
        }
        // Exit codes follow `veil help reload`: 1 nobody answered, 2 refused or bad input, 3 needs a restart.
        // Scripts tell them apart, so they must not change.
        if (verb == "set" && view.Length == 0) { stderr.WriteLine("veil: set: what? (veil set exit-node NAME|off)"); return 2; }
        string? reply = ControlClient.Ask(path, network + verb + view);
        if (reply == null)
        {
            stderr.WriteLine($"veil: no daemon answers on {path} (is 'veil up' running? use --control PATH)");
            return 1;
        }
        // Replies starting "error:" or "restart:" are one line for stderr; the exit code says which.
        if (reply.StartsWith("error:")) { stderr.Write("veil: " + reply[6..].TrimStart()); return 2; }
        if (reply.StartsWith("restart:")) { stderr.Write("veil: " + reply[8..].TrimStart()); return 3; }
        stdout.Write(reply);
        // `veil status` and `veil health` tell a watchdog whether any peer is up: 3 when none is.
        if (verb == "health") return reply.StartsWith("ok:") ? 0 : 3;
        if (verb == "status" && ControlClient.Ask(path, network + "health") is string health && health.StartsWith("down:")) return 3;
        return 0;
    }

    // A network's name as [[network]] allows it: a request line is split on spaces.
    private static bool IsNetworkName(string s) => s.Length is > 0 and <= 15 && !s.Contains(' ');

    /// <summary>`veil ping PEER [-c N]`: N Veil-layer echo requests, one a second, each answered
    /// with the path it came back on and the round trip (a lost one shows after 2 s).</summary>
    internal static int Ping(string[] args, TextWriter stdout, TextWriter stderr)
    {
        string path = Tune.DefaultControlPath, network = "";
        string? peer = null;
        int count = 4;
        for (int i = 1; i < args.Length; i++)
        {
            if (args[i] == "--control" && i + 1 < args.Length) path = args[++i];
            else if (args[i].StartsWith("--control=")) path = args[i]["--control=".Length..];
            else if (args[i] == "--network" && i + 1 < args.Length && network.Length == 0 && IsNetworkName(args[i + 1])) network = "network " + args[++i] + " ";
            // About 17 minutes at one a second; a -c out of range is refused, not clamped.
            else if (args[i] == "-c" && i + 1 < args.Length && int.TryParse(args[i + 1], out count) && count is >= 1 and <= 1000) i++;
            else if (!args[i].StartsWith('-') && peer == null) peer = args[i];
            else { stderr.WriteLine($"veil: ping: bad argument '{args[i]}' (see 'veil help ping')"); return 2; }
        }
        if (peer == null) { stderr.WriteLine("veil: ping: which peer? (veil ping NAME|PUBKEY [-c N])"); return 2; }
        int answered = 0;
        double min = double.MaxValue, max = 0, sum = 0;
        for (int k = 0; k < count; k++)
        {
            // One a second, as ping(8) does; each echo is its own connection to the control socket.
            if (k > 0) Thread.Sleep(1000);
            string? reply = ControlClient.Ask(path, network + "ping " + peer, 2000);
            // No reply while the socket file exists is a lost echo (the 2 s receive timeout ran out), counted
            // below; only a missing socket means there is no daemon.
            if (reply == null && !File.Exists(path)) { stderr.WriteLine($"veil: no daemon answers on {path} (is 'veil up' running? use --control PATH)"); return 1; }
            if (reply != null && reply.StartsWith("error:")) { stderr.Write("veil: " + reply[6..].TrimStart()); return 2; }
            if (reply == null || !reply.StartsWith("pong")) { stdout.WriteLine($"no answer from {peer} within 2 s"); continue; }
            stdout.Write(reply);
            answered++;
            int at = reply.IndexOf("time=", StringComparison.Ordinal);
            // The daemon formats time= with the invariant culture; parse it the same way whatever LANG says.
            if (at >= 0 && double.TryParse(reply[(at + 5)..].Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture, out double ms))
                (min, max, sum) = (Math.Min(min, ms), Math.Max(max, ms), sum + ms);
        }
        stdout.Write($"{count} sent, {answered} answered");
        stdout.WriteLine(answered > 0 ? string.Create(System.Globalization.CultureInfo.InvariantCulture, $", rtt min/avg/max {min:F2}/{sum / answered:F2}/{max:F2} ms") : "");
        // As ping(8): success when any echo came back, so `veil ping PEER -c 1 && …` works in scripts.
        return answered > 0 ? 0 : 1;
    }

    // -1 for an unknown topic: Main prints the error and exits 2, as for any bad input.
    internal static int Help(string? topic, TextWriter o)
    {
        switch (topic)
        {
            case "up":
                o.Write("""
                usage: veil up --key FILE --address CIDR [flags]
                  --key FILE              private key file (base64, mode 0600)
                  --listen ADDR:PORT      UDP listen address (default 0.0.0.0:51820, dual-stack)
                  --address CIDR          overlay address of this node (repeatable: IPv4 and IPv6);
                                          auto (with --mesh and --network): one per network, from
                                          the key; a collision moves the higher key's
                  --tun NAME              interface name (default veil0)
                  --mode tun|tap|hub      tap: an Ethernet TAP switched by learned MAC addresses;
                                          hub: every frame to every peer (default tun)
                  --bridge NAME           with tap|hub: keep the TAP a port of bridge NAME
                  --peer PUBKEY@HOST:PORT a peer (repeatable); IPv6 hosts in [brackets]; @HOST:PORT may be
                                          left out for a peer that always connects first
                  --allow CIDR            allowed IPs of the peer given just before (repeatable)
                  --allow-mac MAC         with tap|hub: a source MAC it may use (repeatable;
                                          none: any, up to 256)
                  --psk FILE              network secret (base64, mode 0600; 'veil genpsk')
                  --mtu N                 interface MTU (default: from the route to the peers, 1420
                                          for a 1500-byte IPv4 underlay, 1400 over IPv6)
                  --keepalive SECONDS     send a keepalive at least this often (default 0 = off; 10 with
                                          --mesh); a peer silent for 3 keepalives is marked down
                  --rekey-after SECONDS   rotate keys after this long (default 120; tests use less)
                mesh:
                  --mesh                  membership by network secret: any node whose handshake proves
                                          --psk is a member, and members learned from others are
                                          contacted directly (without it: only --peer and --trust keys)
                  --trust PUBKEY          this key may be a member; its endpoint is learned (repeatable)
                  --name NAME             this node's name in the mesh (default: start of its key)
                  --claim CIDR            announce a subnet behind this node (repeatable); the --address
                                          host routes are always announced
                  --metric N              metric of this node's claims, lower wins (default 100)
                  --network CIDR          the network prefix: other members' host addresses inside it
                                          are accepted (default: the networks of --address)
                  --accept CIDR           also accept members' claims inside CIDR (repeatable)
                  --relay, --no-relay     carry sealed records between members that cannot reach
                                          each other directly (default: --relay)
                  --relay-rate MBIT       per relayed pair and direction (default 20)
                  --fec auto|off          parity records on paths where the peer reports loss,
                                          sized to it; nothing on a clean path (default auto,
                                          reloadable)
                  --port-mapping, --no-port-mapping   ask the gateway to forward the UDP port (PCP,
                                          NAT-PMP or UPnP IGD) and announce it (default: on)
                  --fix-rp-filter         where the reverse-path filter is strict (rp_filter 1,
                                          which drops replies from routed subnets), make it
                                          loose (2) on the TUN alone
                  --exit                  be an exit node: announce 0.0.0.0/0 and ::/0, forward for
                                          members and masquerade them out of the other interfaces
                  --exit-for PATTERN      with --exit: serve only members whose name matches
                                          (with '*') or whose public key it is (repeatable,
                                          reloadable); others get no default route, and what
                                          they send for the exit is dropped
                  --exit-node NAME|KEY    send everything but the tunnel's own packets through the
                                          member NAME, or the one with public key KEY (its
                                          --exit), the LAN included
                  --exit-allow-lan        with --exit-node: the main table's routes (the LAN, other
                                          interfaces) still win; a router with LAN clients needs it
                  --isolate               peers reach this node (and its exit) but not each other
                                          through it; no relaying (reloadable)
                  --filter RULE           '[allow|deny] in|out tcp|udp|icmp|any [PORT[-PORT]]
                                          [from|to PEER-PATTERN]' (repeatable, reloadable): a
                                          direction with rules passes only what they allow,
                                          and the replies of what passed
                  --listen-tcp ADDR:PORT  also take the same records over TCP (e.g. 0.0.0.0:443), for
                                          members whose networks block UDP
                  --peer-tcp ADDR:PORT    the --listen-tcp of the --peer given just before: used when
                                          no member has answered over UDP for 3 s
                  --state FILE            remember the members learned here, to find them after a
                                          restart while --peer is down (default: "state" beside --config)
                  --beacon-store FILE|'|CMD ARG...'   every 10 min, write this node's endpoints sealed
                                          with --psk to FILE, or to CMD's stdin (no shell, 10 s limit)
                  --beacon-load FILE|'|CMD ARG...'    read other members' beacons from FILE or CMD's stdout
                                          and try their endpoints (stale, foreign or bad ones: ignored)
                  --control PATH          control socket (default /var/run/veil.sock)
                  --log-level LEVEL       error|warn|info|debug (default info)
                  --log-format FORMAT     text|json|plain (default text; plain: text without ts=, for logd/journald)
                  --config FILE           TOML file with the same keys (see veil.toml.example); flags win
                  --mgmt ADDR:PORT|off    management HTTP: / (a page), /status, /metrics, /healthz (default 127.0.0.1:7777)
                  --mgmt-acl CIDR[,CIDR]  who may use it (default 127.0.0.0/8,::1/128)
                  --healthz-grace S       /healthz says 503 once no peer was up for S seconds (default 120)
                  --hook EVENT=PROGRAM    run PROGRAM (absolute path, no shell) on peer_up, peer_down, endpoint_changed,
                                          route_added, route_removed, handshake_gave_up, reloaded, reload_rolled_back;
                                          the event's fields in VEIL_* environment variables (repeatable)
                  --max-sessions N        peers holding session keys at most (default 1024)
                  --handshake-rate N      handshakes per second answered without a cookie (default 100)
                  --handshake-rate-per-source N   per source address; more are dropped (default 10)
                  --user NAME             drop root after setup, keeping CAP_NET_ADMIN
                  --cipher NAME           auto (measure at start, default) | chacha20-poly1305 | aes-256-gcm
                  --workers N             threads, each with a TUN queue and a socket, at most 16 (default
                                          0: one per core, at most 8, where there are more than 2 cores, else 1)
                  --check                 validate everything, create nothing, exit 0 or 2

                """);
                return 0;
            case null:
                o.Write("""
                veil — mesh VPN daemon
                usage: veil COMMAND [flags]
                  genkey            print a new base64 private key
                  pubkey            read a private key on stdin, print its public key
                  genpsk            print a new base64 network secret
                  genadmin          print a new network admin key
                  adminpub          read an admin key on stdin, print its public half
                  revoke PUBKEY     end a member for good: signed with the admin key, passed on by members
                  up [flags]        run the daemon in the foreground ('veil help up')
                  status [--json]   ask the running daemon (also --short, --dump)
                  peers, routes     its peers, its routing table ([--json])
                  health            is any peer up? (exit 3 if none)
                  ping PEER         echo at the Veil layer: path and round trip
                  netcheck          how members see this node: NAT kind, port mapping, relay, paths
                  reload            re-read the config without dropping sessions (--confirm S: roll back unless confirmed)
                  confirm           keep the changes of a 'reload --confirm' window
                  set exit-node X   send traffic through member X (its --exit), or off
                  down              leave the mesh gracefully
                  init              create a key and a config file for this node
                  invite            print a one-time token that lets another node join (asks the running node)
                  join TOKEN        join the network of an invite: key, config, and the inviter's approval
                  add-peer          add a peer to a config file (then: veil reload)
                  doctor            check this host and the config, one line per check
                  service install   run this binary as a systemd service (veil@NAME; also: uninstall)
                  version           print the version and runtime identifier
                  bench [SECONDS]   micro-benchmarks: AEAD per record size, trie lookups, handshakes
                  selftest          known-answer tests and struct layouts on this device; exit 1 if any fail
                  completion SHELL  a completion script for bash or zsh
                  help [COMMAND]    this text, or a command's flags

                """);
                return 0;
            default:
                if (!Topics.TryGetValue(topic, out string? text)) return -1;
                o.Write(text);
                return 0;
        }
    }

    private static readonly Dictionary<string, string> Topics = new()
    {
        ["status"] = "usage: veil status [--json|--short|--dump] [--control PATH]   the node and its peers\n" +
                     "       veil peers|routes [--json] [--control PATH]                its peers, its routing table\n" +
                     "       veil health [--control PATH]                               one line: is any peer up?\n" +
                     "--short: one line per peer; --dump: tab-separated (node line, then a peer line each; '-' for unknown)\n" +
                     "--network NAME (these, reload, down, ping, set, confirm): one network of a node with [[network]] tables;\n" +
                     "  without it each network answers under its name (JSON: {\"networks\":{NAME:...}})\n" +
                     "exit status: 0 ok (status, health: a peer is up), 1 no daemon answers, 2 bad input, 3 (status, health) no peer is up\n",
        ["ping"] = "usage: veil ping NAME|PUBKEY [-c N] [--network NAME] [--control PATH]   N (default 4) echo requests at the Veil layer, one a second;\n  each answer shows the path (direct or relay:NAME), the endpoint and the round trip\nexit status: 0 some answered, 1 none (or no daemon), 2 bad input or no such peer\n",
        ["netcheck"] = "usage: veil netcheck [--control PATH]   where members see this node, whether that depends on the member\n  (symmetric NAT), the gateway's port mapping, the relay, the path to each peer\n",
        ["reload"] = "usage: veil reload [--confirm SECONDS] [--network NAME] [--control PATH]   re-read flags and --config file (same as SIGHUP)\n" +
                     "  --confirm: opens a window (10 to 3600 s): what is applied in it (this reload, file edits) goes back to the\n" +
                     "  config that ran before unless 'veil confirm' comes in time; open it before editing a remote node's file\n" +
                     "exit status: 0 applied, 1 no daemon, 2 the new config is invalid (nothing applied), 3 a changed key needs a restart (nothing applied)\n",
        ["confirm"] = "usage: veil confirm [--control PATH]   keep what was applied since 'veil reload --confirm'\n",
        ["set"] = "usage: veil set exit-node NAME|off [--control PATH]   use another exit node, or none, without a restart\n",
        ["down"] = "usage: veil down [--network NAME] [--control PATH]   leave gracefully: close sessions, remove the interface\n",
        ["init"] = "usage: veil init [--dir DIR] [--address CIDR] [--listen ADDR:PORT]   DIR/private.key (0600) and DIR/veil.toml (default DIR /etc/veil); never overwrites a key\n",
        ["invite"] = "usage: veil invite [--expires 1h] [--name NAME] [--endpoint HOST:PORT] [--network NAME] [--isolated] [--control PATH]\n  asks the running node (started with --config) for a one-time token; it expires and works once\n" +
                     "  --isolated: the joiner is written down as an isolated peer: it reaches this node (and its exit) only,\n" +
                     "  and members are told to refuse its sessions\n" +
                     "       veil invite --list | --revoke ID   the invites not yet expired (ID, address, name, state); revoke one not yet used\n",
        ["join"] = "usage: veil join TOKEN [--dir DIR] [--name NAME] [--listen ADDR:PORT]   key + config in DIR (default /etc/veil), approved by the inviter\n",
        ["add-peer"] = "usage: veil add-peer --config FILE --peer PUBKEY[@HOST:PORT] [--allow CIDR]... [--name NAME] [--keepalive SECONDS]\n  validates the peer, appends it to FILE; a running daemon applies it on 'veil reload'\n",
        ["selftest"] = "usage: veil selftest   X25519, AEAD (both backends), HKDF and Noise known answers, epoll and UDP batch layouts against this kernel\nexit status: 0 all passed, 1 any failed\n",
        ["revoke"] = "usage: veil revoke PUBKEY --admin-key FILE [--control PATH] [--print]\n  signs a revocation with the network's admin key (veil genadmin; members name its public half, veil adminpub,\n  as admin = ...) and gives it to the running node, which refuses the key and passes the revocation on;\n  --print writes it out instead, one line for a node's revocations file\n",
        ["service"] = "usage: veil service install|uninstall [--name NAME] [--root DIR]\n  install: copies this binary to /usr/local/bin/veil, writes veil@.service (CAP_NET_ADMIN only, restart on failure),\n  creates /etc/veil (0700) and enables veil@NAME (default veil: /etc/veil/veil.toml); uninstall: stops, disables and\n  removes both, keeping /etc/veil. --root DIR works on another file system tree (enabled offline)\n",
        ["doctor"] = "usage: veil doctor [the flags of 'veil up', e.g. --config FILE]   one ok/FAIL line per check; exit 1 if any failed\n",
        ["peers"] = "usage: veil peers [--json] [--control PATH]   the configured peers and their state\n",
        ["routes"] = "usage: veil routes [--json] [--control PATH]   the routing table: prefix -> peer\n",
        ["health"] = "usage: veil health [--control PATH]   one line: ok with a peer up, down (and since when) with none\nexit status: 0 a peer is up, 1 no daemon answers, 3 no peer is up\n",
        ["genkey"] = "usage: veil genkey > FILE   a new private key, base64, on stdout (warns if FILE can be read by others; umask 077 first)\n",
        ["pubkey"] = "usage: veil pubkey < KEYFILE   the public key of the private key read on stdin\n",
        ["genpsk"] = "usage: veil genpsk > FILE   a new network secret (--psk), base64, on stdout; every member needs the same\n",
        ["genadmin"] = "usage: veil genadmin > FILE   a new network admin key (it signs revocations); members name its public half\n",
        ["adminpub"] = "usage: veil adminpub < ADMINKEY   the public half of an admin key, for members' admin = ...\n",
        ["version"] = "usage: veil version   the version and runtime identifier of this binary\n",
        ["bench"] = "usage: veil bench [SECONDS]   micro-benchmarks on this device: AEAD per record size, trie lookups, handshakes\n",
        ["completion"] = "usage: veil completion bash|zsh   a completion script: source <(veil completion bash), or put it in\n  /etc/bash_completion.d/veil; busybox ash (OpenWrt) has no programmable completion\n",
        ["help"] = "usage: veil help [COMMAND]   the commands, or one command's usage and flags\n",
    };

    /// <summary>`veil completion bash|zsh`: commands, `veil up`'s flags, the views' flags and help
    /// topics, from the same tables the parser and `veil help` use.</summary>
    internal static int Completion(string shell, TextWriter o, TextWriter stderr)
    {
        if (shell is not ("bash" or "zsh"))
        {
            stderr.WriteLine(shell == "ash"
                ? "veil: completion: busybox ash (OpenWrt's shell) has no programmable completion; 'veil help' lists the commands"
                : "veil: completion: which shell? (veil completion bash|zsh)");
            return 2;
        }
        var commands = new List<string>(Topics.Keys) { "up" };
        commands.Sort(StringComparer.Ordinal);
        string upFlags = string.Join(' ', UpConfig.Flags());
        // zsh runs the bash function through bashcompinit.
        if (shell == "zsh") o.WriteLine("autoload -U +X bashcompinit && bashcompinit");
        o.Write($$"""
            _veil() {
                local cur=${COMP_WORDS[COMP_CWORD]} cmd=${COMP_WORDS[1]}
                if [ "$COMP_CWORD" -eq 1 ]; then
                    COMPREPLY=($(compgen -W "{{string.Join(' ', commands)}}" -- "$cur")); return
                fi
                case $cmd in
                    up|doctor) COMPREPLY=($(compgen -W "{{upFlags}}" -- "$cur")) ;;
                    status) COMPREPLY=($(compgen -W "--json --short --dump --control" -- "$cur")) ;;
                    peers|routes) COMPREPLY=($(compgen -W "--json --control" -- "$cur")) ;;
                    help) COMPREPLY=($(compgen -W "{{string.Join(' ', commands)}}" -- "$cur")) ;;
                    completion) COMPREPLY=($(compgen -W "bash zsh" -- "$cur")) ;;
                    *) COMPREPLY=($(compgen -f -- "$cur")) ;;
                esac
            }
            complete -F _veil veil

            """);
        return 0;
    }
}

/// <summary>veil selftest: known answers for every primitive and the Noise pattern, and the libc
/// struct layouts checked against this kernel, on the device itself (after an upgrade, on a new
/// board, under an emulator). Prints a line per check; exit 0 when all pass, 1 otherwise.</summary>
internal static class SelfTest
{
    private static byte[] H(string hex) => Convert.FromHexString(hex);

    internal static int Run(TextWriter o)
    {
        int failed = 0;
        void Check(string name, bool ok) { o.WriteLine((ok ? "ok   " : "FAIL ") + name); if (!ok) failed++; }
        static bool Eq(ReadOnlySpan<byte> a, ReadOnlySpan<byte> b) => a.SequenceEqual(b);

        // X25519: RFC 7748 §5.2 (the second has u's top bit set: it must be masked) and §6.1.
        byte[] k = new byte[32];
        X25519.ScalarMult(k, H("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4"), H("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c"));
        bool x1 = Eq(k, H("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"));
        X25519.ScalarMult(k, H("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d"), H("e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493"));
        bool x2 = Eq(k, H("95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"));
        byte[] alice = H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"), bobPub = H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        X25519.PublicKey(k, alice);
        bool x3 = Eq(k, H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"));
        bool x4 = X25519.Dh(k, alice, bobPub) && Eq(k, H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"));
        Check("x25519 (RFC 7748 5.2, 6.1)", x1 && x2 && x3 && x4);

        // AesGcmNi seals short AES records, EVP the long ones and ChaCha20-Poly1305, and the BCL is the
        // fallback (VEIL_AEAD_BCL=1); each is checked, since a libcrypto on a new board may differ from the build host's.
        // AEADs through each backend: RFC 8439 §2.8.2 and Wycheproof aes_gcm tcId 91.
        byte[] plain = Encoding.ASCII.GetBytes("Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.");
        byte[] chachaOut = H("d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc3ff4def08e4b7a9de576d26586cec64b6116" + "1ae10b594f09e26a7e902ecbd0600691");
        foreach (AeadImpl impl in new[] { AeadImpl.Fastest, AeadImpl.Evp, AeadImpl.BaseLibrary })
        {
            string backend = impl == AeadImpl.BaseLibrary ? "bcl" : impl == AeadImpl.Evp ? (Evp.Loaded ? "openssl-evp" : "bcl") : Aead.Backend;
            Check($"chacha20-poly1305 (RFC 8439 2.8.2, {backend})", AeadRoundTrip(AeadKind.ChaCha20Poly1305, impl,
                H("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"), H("070000004041424344454647"), H("50515253c0c1c2c3c4c5c6c7"), plain, chachaOut));
            Check($"aes-256-gcm (Wycheproof 91, {backend})", AeadRoundTrip(AeadKind.Aes256Gcm, impl,
                H("92ace3e348cd821092cd921aa3546374299ab46209691bc28b8752d17f123c20"), H("00112233445566778899aabb"), H("00000000ffffffff"),
                H("00010203040506070809"), H("e27abdd2d2a53d2f136b" + "9a4a2579529301bcfb71c78d4060f52c")));
        }

        // HKDF-SHA256: RFC 5869 A.1.
        byte[] okm = new byte[42];
        Check("hkdf-sha256 (RFC 5869 A.1)", Hkdf.Derive(okm, H("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b"), H("000102030405060708090a0b0c"), H("f0f1f2f3f4f5f6f7f8f9"))
            && Eq(okm, H("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")));

        Check("noise IKpsk2 (cacophony transcript)", NoiseTranscript());
        Check($"epoll_event layout ({RuntimeInformation.ProcessArchitecture}: {Libc.EpollEventLen} bytes)", EpollLayout());
        Check("mmsghdr, sockaddr and UDP batching (loopback)", UdpBatches());
        o.WriteLine(failed == 0 ? "selftest: all passed" : $"selftest: {failed} failed");
        return failed == 0 ? 0 : 1;
    }

    private static bool AeadRoundTrip(AeadKind kind, AeadImpl impl, byte[] key, byte[] nonce, byte[] aad, byte[] plain, byte[] expect)
    {
        using var aead = new Aead(kind, key, impl);
        byte[] sealedOut = new byte[plain.Length + Aead.TagLen], opened = new byte[plain.Length];
        aead.Seal(nonce, plain, aad, sealedOut);
        if (!sealedOut.AsSpan().SequenceEqual(expect) || !aead.Open(nonce, sealedOut, aad, opened) || !opened.AsSpan().SequenceEqual(plain)) return false;
        sealedOut[0] ^= 1;
        return !aead.Open(nonce, sealedOut, aad, opened);          // and a changed byte is refused
    }

    // The two messages of the Noise_IKpsk2_25519_ChaChaPoly_SHA256 vector of cacophony (public domain).
    private static bool NoiseTranscript()
    {
        // The vector's own prologue ("John Galt") and psk, not Veil's: it pins the Noise machinery, and
        // Veil's prologue is only a different input to the same code.
        byte[] name = Encoding.ASCII.GetBytes(Spec.NoiseProtocolName), prologue = H("4a6f686e2047616c74");
        byte[] psk = H("54686973206973206d7920417573747269616e20706572737065637469766521");
        byte[] iStatic = H("e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1"), iEph = H("893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a");
        byte[] rStatic = H("4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893"), rEph = H("bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b");
        byte[] p0 = H("4c756477696720766f6e204d69736573"), p1 = H("4d757272617920526f746862617264");
        byte[] c0 = H("ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79442ec9b09893d0f510791784c10cbc959f25b1766e0def6e301d14fbca1c7790ac829b8b3674f5f649a5f0e98479662cbfbf2b2c47cd4b09fcd266cd29d7cb675f1808849707847840f6d178ec4d3733aa");
        byte[] c1 = H("95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f1448088439a1b3cebf680b2c74217fcb5eba4ff58a9468cd90c4aca6194f57479b379a7");
        byte[] iPub = new byte[32], rPub = new byte[32], ss = new byte[32], re = new byte[32], rs = new byte[32];
        X25519.PublicKey(iPub, iStatic);
        X25519.PublicKey(rPub, rStatic);
        var ini = new NoiseState();
        var resp = new NoiseState();
        // IK: both sides start from the responder's static key (the pre-message "<- s").
        ini.Initialize(name, prologue, rPub);
        resp.Initialize(name, prologue, rPub);
        byte[] m0 = new byte[c0.Length], m1 = new byte[c1.Length], got0 = new byte[p0.Length], got1 = new byte[p1.Length];
        // The ss token's DH is done by the caller, as Handshaker passes each peer's StaticShared in.
        if (!X25519.Dh(ss, iStatic, rPub) || !ini.WriteMessage1(iEph, iPub, rPub, ss, p0, m0) || !m0.AsSpan().SequenceEqual(c0)) return false;
        if (!resp.ReadMessage1Static(rStatic, m0, re, rs) || !rs.AsSpan().SequenceEqual(iPub)) return false;
        if (!X25519.Dh(ss, rStatic, rs) || !resp.ReadMessage1Payload(ss, m0, got0) || !got0.AsSpan().SequenceEqual(p0)) return false;
        if (!resp.WriteMessage2(rEph, re, rs, psk, p1, m1) || !m1.AsSpan().SequenceEqual(c1)) return false;
        if (!ini.ReadMessage2(iEph, iStatic, psk, m1, got1) || !got1.AsSpan().SequenceEqual(p1)) return false;
        Span<byte> h = stackalloc byte[32];
        // The handshake hash after the last message: equal to cacophony's only if every token was mixed in
        // the same order.
        for (int i = 0; i < 32; i++) h[i] = ini.H[i];
        return h.SequenceEqual(H("8310f86394dc0dabb40beb8210031556db4403ab1202db7034c526232147a700"));
    }

    // The kernel fills an epoll_event for an eventfd registered with its fd as data: read back at the
    // offsets this architecture uses (packed on x86 only), the event mask and the fd must come out.
    private static unsafe bool EpollLayout()
    {
        int ep = Libc.EpollCreate1(Libc.EPOLL_CLOEXEC), efd = Libc.EventFd(0, Libc.EFD_NONBLOCK | Libc.EFD_CLOEXEC);
        try
        {
            if (ep < 0 || efd < 0 || Libc.EpollAdd(ep, efd) != 0) return false;
            ulong one = 1;
            if (Libc.Write(efd, (byte*)&one, 8) != 8) return false;
            byte* events = stackalloc byte[64];
            new Span<byte>(events, 64).Fill(0xEE);
            return Libc.EpollWait(ep, events, 2, 1000) == 1 && *(uint*)events == Libc.EPOLLIN && Libc.EpollEventFd(events, 0) == efd
                && events[Libc.EpollEventLen] == 0xEE;               // nothing written past one event
        }
        finally { if (efd >= 0) Libc.Close(efd); if (ep >= 0) Libc.Close(ep); }
    }

    // Three datagrams of two sizes through sendmmsg/recvmmsg (and GSO/GRO where the kernel has them):
    // each arrives intact, in order, from the sender's port.
    private static bool UdpBatches()
    {
        using UdpSocket tx = UdpSocket.Bind(IPAddress.Loopback, 0), rx = UdpSocket.Bind(IPAddress.Loopback, 0);
        var b = new PacketBatch(4, Tune.SlotLen);
        // Two equal sizes and a shorter tail: the shape of one GSO run (UdpSocket.SendBatch), so on a
        // kernel with GSO/GRO the segmenting and coalescing paths run too.
        int[] lens = [1200, 1200, 333];
        var to = Endpoint.FromIp(IPAddress.Loopback, rx.LocalPort);
        for (int i = 0; i < lens.Length; i++)
        {
            b.Slot(i)[..lens[i]].Fill((byte)(i + 1));
            b.Offset[i] = 0;
            b.Length[i] = lens[i];
            b.Endpoints[i] = to;
        }
        b.Count = lens.Length;
        if (tx.SendBatch(b) != 0) return false;
        int got = 0;
        // Loopback delivers at once; 100 tries of 10 ms bound the wait at a second on a loaded device.
        for (int tries = 0; tries < 100 && got < lens.Length; tries++)
        {
            b.Count = 0;
            if (rx.ReceiveBatch(b) == 0) { Thread.Sleep(10); continue; }
            for (int i = 0; i < b.Count; i++, got++)
            {
                if (got >= lens.Length || b.Length[i] != lens[got] || b.Packet(i).ContainsAnyExcept((byte)(got + 1))) return false;
                if (b.Endpoints[i].Port != tx.LocalPort) return false;
            }
        }
        return got == lens.Length;
    }
}

/// <summary>veil bench: micro-benchmarks of the hot pieces, in this process (not timed tests).</summary>
internal static class Bench
{
    private static double PerSecond(Action<int> body, int batch, double seconds = 0.5)
    {
        body(batch);                                           // warm-up: JIT and first-use paths
        var sw = Stopwatch.StartNew();
        long done = 0;
        while (sw.Elapsed.TotalSeconds < seconds) { body(batch); done += batch; }
        return done / sw.Elapsed.TotalSeconds;
    }

    internal static int Run(string[] args, TextWriter o)
    {
        // Seconds per measurement; every figure below takes this long.
        double seconds = args.Length > 1 && double.TryParse(args[1], System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out double s) && s > 0 ? s : 0.5;
        o.WriteLine($"veil {Cli.Version} bench ({RuntimeInformation.RuntimeIdentifier}, {Environment.ProcessorCount} cpus, aead backend {Aead.Backend})");
        byte[] key = new byte[32], nonce = new byte[Spec.NonceLen], aad = new byte[Record.HeaderLen];
        RandomNumberGenerator.Fill(key);
        foreach (AeadKind kind in new[] { AeadKind.ChaCha20Poly1305, AeadKind.Aes256Gcm })
        {
            if (!Aead.IsSupported(kind)) continue;
            using var aead = new Aead(kind, key);
            // Small packets, the default MTU and a jumbo frame.
            foreach (int len in new[] { 64, 512, 1420, 9000 })
            {
                byte[] buf = new byte[len + Spec.TagLen];
                double seal = PerSecond(n => { for (int i = 0; i < n; i++) aead.Seal(nonce, buf.AsSpan(0, len), aad, buf); }, 256, seconds);
                aead.Seal(nonce, buf.AsSpan(0, len), aad, buf);
                byte[] sealedCopy = (byte[])buf.Clone();
                double open = PerSecond(n => { for (int i = 0; i < n; i++) { sealedCopy.CopyTo(buf, 0); aead.Open(nonce, buf, aad, buf); } }, 256, seconds);
                o.WriteLine($"aead {kind,-16} {len,5} B  seal {seal,12:N0}/s ({1e6 / seal,6:F2} us)  open {open,12:N0}/s ({1e6 / open,6:F2} us)");
            }
        }
        foreach (int count in new[] { 10, 1_000, 100_000 })
        {
            var trie = new RouteTrie();
            var rng = new Random(count);
            byte[] a = new byte[4];
            for (int i = 0; i < count; i++) { rng.NextBytes(a); trie.Insert(new IpPrefix(a, 8 + rng.Next(25)), i % 64); }
            // A power of two, so the hot loop picks a probe with a mask instead of a division.
            byte[][] probes = new byte[1024][];
            for (int i = 0; i < probes.Length; i++) { probes[i] = new byte[4]; rng.NextBytes(probes[i]); }
            double lookups = PerSecond(n => { for (int i = 0; i < n; i++) trie.Lookup(probes[i & 1023]); }, 4096, seconds);
            o.WriteLine($"trie {count,7} prefixes  lookup {lookups,14:N0}/s ({1e9 / lookups,6:F1} ns)");
        }
        // UpConfig.Load is not run (no key files): the MTU it would derive is set by hand. The peers sit on
        // documentation addresses (RFC 5737); nothing is sent, the messages only go from array to array.
        var cfgI = new UpConfig { Mtu = 1420 };
        var cfgR = new UpConfig { Mtu = 1420 };
        X25519.GeneratePrivateKey(cfgI.PrivateKey);
        X25519.GeneratePrivateKey(cfgR.PrivateKey);
        Key32 pubI = default, pubR = default;
        X25519.PublicKey(pubI, cfgI.PrivateKey);
        X25519.PublicKey(pubR, cfgR.PrivateKey);
        cfgI.Peers.Add(new PeerConfig { PublicKey = pubR, Endpoint = Endpoint.FromV4(0xC0000202, 51820) });
        cfgR.Peers.Add(new PeerConfig { PublicKey = pubI });
        var quiet = new Log(TextWriter.Null, LogLevel.Error);
        Node ini = new(cfgI, quiet, new Counters()), resp = new(cfgR, quiet, new Counters());
        byte[] hello = new byte[Wire.ClientHelloLen], answer = new byte[Wire.ServerHelloLen];
        var st = new HelloState();
        long unixNs = 1_700_000_000_000_000_000;                // each hello newer than the last, as in real life
        double hs = PerSecond(n =>
        {
            for (int i = 0; i < n; i++)
            {
                ini.Handshaker.CreateClientHello(ini.Peers[0], 1, unixNs += 1000, 0, hello);
                resp.Handshaker.ConsumeClientHello(hello, default, 0, st);
                resp.Handshaker.CreateServerHello(st, 2, 0, answer, out _);
                ini.Handshaker.ConsumeServerHello(answer, ini.Peers[0], out _);
            }
        }, 4, seconds);
        o.WriteLine($"handshake (both sides, one core)  {hs,10:N0}/s ({1e3 / hs,6:F2} ms)");
        // What a flood costs the responder per hello: a wrong MAC1 is dropped after one HMAC; under
        // load a valid MAC1 without a cookie earns a cookie reply.
        byte[] junk = (byte[])hello.Clone(), reply = new byte[Wire.CookieReplyLen];
        junk[Wire.ClientHelloMac1Offset] ^= 1;
        Endpoint from = Endpoint.FromV4(0xCB00710A, 40000);
        double badMac1 = PerSecond(n => { for (int i = 0; i < n; i++) resp.Handshaker.Mac1Matches(junk); }, 256, seconds);
        double cookies = PerSecond(n =>
        {
            Span<byte> cookie = stackalloc byte[Spec.MacLen];
            for (int i = 0; i < n; i++)
                if (resp.Handshaker.Mac1Matches(hello))
                {
                    resp.Handshaker.MakeCookie(from, 0, cookie);
                    if (!Handshaker.CookieMatches(hello, cookie)) resp.Handshaker.CreateCookieReply(hello, cookie, reply);
                }
        }, 256, seconds);
        o.WriteLine($"hello flood: wrong MAC1 dropped  {badMac1,10:N0}/s ({1e6 / badMac1,6:F2} us)");
        o.WriteLine($"hello flood: cookie replies      {cookies,10:N0}/s ({1e6 / cookies,6:F2} us)");
        double dh = PerSecond(n => { Span<byte> out32 = stackalloc byte[32]; for (int i = 0; i < n; i++) X25519.Dh(out32, cfgI.PrivateKey, pubR); }, 16, seconds);
        o.WriteLine($"x25519                            {dh,10:N0}/s ({1e6 / dh,6:F1} us)");
        return 0;
    }
}

// ==== 19. Onboarding =============================================================================
// Getting a node into a network without copying keys by hand:
//   veil init      a private key (0600) and a config file, written atomically, never over an old key
//   veil invite    asks the running daemon for a one-time token: network name and prefix, the
//                  inviter's endpoint, public key and overlay address, the joiner's address, an expiry,
//                  a random secret, and an HMAC tag under a key only the inviter can derive
//   veil join      makes a key and sends a JoinHello to the inviter: the token without its secret,
//                  the joiner's public key, and HMAC(secret, key). The inviter checks the tag (the
//                  token was not forged or altered), the expiry and that the invite is unused, then
//                  writes the joiner into its config file as a trusted peer, reloads, and answers with
//                  a JoinAccept sealed under a key derived from the secret (carrying the network
//                  secret). Only the token's holder can use it, once.
//   veil add-peer  validates a peer and appends it to a config file (applied by `veil reload`)
//   veil doctor    one pass/fail line per check of the host and the config
//   veil service   install|uninstall: the binary as a systemd service (veil@NAME runs
//                  /etc/veil/NAME.toml), with CAP_NET_ADMIN only; configs and keys are never removed
// Join messages use the handshake preamble with types 4 (JoinHello) and 5 (JoinAccept); the node's
// side of them (Node, partial) closes the file.

internal sealed class InviteToken
{
    // 2 added the inviter's name; a token lives an hour or so, so no version 1 is kept.
    internal const byte Version = 2;
    // The version in the text too: a user (and `veil join`) can tell a Veil token from anything pasted.
    internal const string Prefix = "veil1-";
    // HMAC-SHA256 cut to 128 bits: forging a tag still takes 2^128 tries, and the token stays short
    // enough to paste.
    internal const int TagLen = 16;
    internal ulong Id;
    internal long ExpiresUnix;
    internal Key32 InviterKey, Secret;
    internal IpPrefix Network;
    internal IfAddress JoinerAddress, InviterAddress;
    internal string Endpoint = "", NetworkName = "", InviterName = "";
    internal byte[] Tag = new byte[TagLen];

    /// <summary>Every field but the tag; the secret zeroed unless withSecret.</summary>
    // The tag covers the body with the secret; the JoinHello sends the body with the secret zeroed and
    // the inviter puts its own copy back to check the tag, so the secret never crosses the network.
    internal byte[] Body(bool withSecret)
    {
        var ms = new MemoryStream();
        Span<byte> b = stackalloc byte[18];
        // The version byte comes first so an older node refuses a newer layout instead of misreading it.
        ms.WriteByte(Version);
        BinaryPrimitives.WriteUInt64BigEndian(b, Id); ms.Write(b[..8]);
        BinaryPrimitives.WriteInt64BigEndian(b, ExpiresUnix); ms.Write(b[..8]);
        ms.Write(InviterKey);
        if (withSecret) ms.Write(Secret); else ms.Write(new byte[32]);
        WritePrefix(ms, Network.IsV6, NetworkAddress(), Network.Bits);
        WritePrefix(ms, JoinerAddress.IsV6, JoinerAddress.Address.GetAddressBytes(), JoinerAddress.Bits);
        WritePrefix(ms, InviterAddress.IsV6, InviterAddress.Address.GetAddressBytes(), InviterAddress.Bits);
        WriteText(ms, Endpoint);
        WriteText(ms, NetworkName);
        WriteText(ms, InviterName);
        return ms.ToArray();
    }

    /// <summary>The joiner's name for the inviter: the one the token carries, else NETWORK-inviter.</summary>
    internal string InviterPeerName() => UpConfig.IsName(InviterName) ? InviterName : UpConfig.MendName(NetworkName + "-inviter");

    private byte[] NetworkAddress()
    {
        byte[] a = new byte[Network.IsV6 ? 16 : 4];
        Network.WriteAddress(a);
        return a;
    }

    private static void WritePrefix(MemoryStream ms, bool v6, byte[] addr, int bits)
    {
        ms.WriteByte(v6 ? (byte)6 : (byte)4);
        ms.Write(addr);
        ms.WriteByte((byte)bits);
    }

    private static void WriteText(MemoryStream ms, string s)
    {
        byte[] t = Encoding.UTF8.GetBytes(s);
        ms.WriteByte((byte)t.Length);
        ms.Write(t);
    }

    internal static void MakeTag(ReadOnlySpan<byte> tokenKey, byte[] bodyWithSecret, Span<byte> tag16)
    {
        Span<byte> full = stackalloc byte[32];
        HMACSHA256.HashData(tokenKey, bodyWithSecret, full);
        full[..TagLen].CopyTo(tag16);
    }

    internal string Encode()
    {
        byte[] body = Body(withSecret: true);
        byte[] all = new byte[body.Length + TagLen];
        body.CopyTo(all, 0);
        Tag.CopyTo(all, body.Length);
        // base64url without padding (RFC 4648 §5): no '+', '/' or '=' for a shell, a URL or a chat client
        // to mangle; Parse puts the padding back.
        return Prefix + Convert.ToBase64String(all).TrimEnd('=').Replace('+', '-').Replace('/', '_');
    }

    /// <summary>Parses a token (or a token body without tag when tagged is false); null when malformed.</summary>
    internal static InviteToken? Decode(ReadOnlySpan<byte> data, bool tagged)
    {
        try
        {
            var t = new InviteToken();
            int i = 0;
            // Every read below is bounds-checked by the span: a truncated token throws and is caught at the
            // end, so the parser needs no length arithmetic of its own. Trailing bytes are refused as well.
            if (data[i++] != Version) return null;
            t.Id = BinaryPrimitives.ReadUInt64BigEndian(data[i..]); i += 8;
            t.ExpiresUnix = BinaryPrimitives.ReadInt64BigEndian(data[i..]); i += 8;
            data.Slice(i, 32).CopyTo(t.InviterKey); i += 32;
            data.Slice(i, 32).CopyTo(t.Secret); i += 32;
            if (!ReadPrefix(data, ref i, out byte[] na, out int nb)) return null;
            t.Network = new IpPrefix(na, nb);
            if (!ReadPrefix(data, ref i, out byte[] ja, out int jb)) return null;
            t.JoinerAddress = new IfAddress(new IPAddress(ja), jb);
            if (!ReadPrefix(data, ref i, out byte[] ia, out int ib)) return null;
            t.InviterAddress = new IfAddress(new IPAddress(ia), ib);
            t.Endpoint = ReadText(data, ref i);
            t.NetworkName = ReadText(data, ref i);
            t.InviterName = ReadText(data, ref i);
            if (tagged)
            {
                data.Slice(i, TagLen).CopyTo(t.Tag);
                i += TagLen;
            }
            return i == data.Length ? t : null;
        }
        catch (Exception e) when (e is ArgumentOutOfRangeException or IndexOutOfRangeException or ArgumentException)
        {
            return null;                                  // ran past the end: truncated or garbage
        }
    }

    /// <summary>A token of another layout: the text prefix right, the version byte not ours.</summary>
    internal static bool OtherVersion(string text)
    {
        text = text.Trim();
        if (!text.StartsWith(Prefix) || text.Length < Prefix.Length + 2) return false;
        string b64 = text.Substring(Prefix.Length, 4).Replace('-', '+').Replace('_', '/');
        byte[] head = new byte[3];
        return Convert.TryFromBase64String(b64, head, out int n) && n > 0 && head[0] != Version;
    }

    internal static InviteToken? Parse(string text)
    {
        text = text.Trim();
        // A real token is a few hundred characters; the bound comes before any decoding.
        if (!text.StartsWith(Prefix) || text.Length > 1024) return null;
        string b64 = text[Prefix.Length..].Replace('-', '+').Replace('_', '/');
        b64 = b64.PadRight(b64.Length + (4 - b64.Length % 4) % 4, '=');
        byte[] raw = new byte[b64.Length];
        return Convert.TryFromBase64String(b64, raw, out int n) ? Decode(raw.AsSpan(0, n), tagged: true) : null;
    }

    private static bool ReadPrefix(ReadOnlySpan<byte> d, ref int i, out byte[] addr, out int bits)
    {
        byte fam = d[i++];
        addr = d.Slice(i, fam == 6 ? 16 : 4).ToArray();
        i += addr.Length;
        bits = d[i++];
        return fam is 4 or 6 && bits <= addr.Length * 8;
    }

    private static string ReadText(ReadOnlySpan<byte> d, ref int i)
    {
        int n = d[i++];
        string s = Encoding.UTF8.GetString(d.Slice(i, n));
        i += n;
        return s;
    }

    /// <summary>HMAC(secret, "veil join" ‖ id ‖ joiner key): proves the token's secret without sending it.</summary>
    // The proof binds the joiner's key: a JoinHello seen on the wire cannot be replayed with another key,
    // and the "veil join" label keeps this HMAC apart from every other use of the secret.
    internal static void JoinProof(ReadOnlySpan<byte> secret, ulong id, ReadOnlySpan<byte> joinerKey, Span<byte> proof16)
    {
        Span<byte> msg = stackalloc byte[9 + 8 + 32];
        "veil join"u8.CopyTo(msg);
        BinaryPrimitives.WriteUInt64BigEndian(msg[9..], id);
        joinerKey.CopyTo(msg[17..]);
        Span<byte> full = stackalloc byte[32];
        HMACSHA256.HashData(secret, msg, full);
        full[..16].CopyTo(proof16);
    }

    // A key of its own (HKDF, another label) so the sealing key is never the proof's HMAC key.
    internal static void AcceptKey(ReadOnlySpan<byte> secret, Span<byte> key32) =>
        Hkdf.Derive(key32, secret, default, "veil join accept"u8);
}

/// <summary>The inviter's side: pending invites (in memory, bounded) and JoinHello handling.</summary>
internal sealed class Invites(Key32 privateKey)
{
    // Bounds the memory and the addresses that invites hold back (ReservedAddresses) while pending.
    private const int MaxPending = 64;
    // After the handshake's types 1-3 in the same preamble, so a join needs no port or socket of its own.
    internal const byte TypeJoinHello = 4, TypeJoinAccept = 5;
    // The payload: the network secret (32) and a 1 that the joiner checks after opening.
    internal const int JoinProofLen = 16, JoinAcceptPayloadLen = 33;

    private sealed class Pending
    {
        internal InviteToken Token = null!;
        internal Key32 JoinerKey;                         // zero until used
        internal bool Written;                            // the joiner is in the config file: answer it
        internal string Name = "";
        internal bool Isolated;                           // --isolated: written down as an isolated peer
        internal Key32 PeerSecret;                        // --isolated: its own secret, never the network's
    }

    /// <summary>A joiner with a valid JoinHello, for the daemon to write down (off the packet path:
    /// the file is synced) before Written answers it.</summary>
    internal sealed record Joiner(ulong InviteId, PeerConfig Peer, Endpoint From);

    private readonly Dictionary<ulong, Pending> _pending = new();
    // Only this node can derive the tag key, so only it can mint a token it will accept. The daemon
    // keeps pending invites in a file of their own (Snapshot, Load) so that a restart voids none.
    private Key32 _tokenKey = TokenKey(privateKey);
    internal readonly Queue<Joiner> Joiners = new();    // at most one per pending invite
    internal Func<Key32, Key32?>? OwnSecretOf;          // a configured peer's own secret (the node's), for a guest answered before a restart
    internal Key32 Psk;

    private static Key32 TokenKey(Key32 priv)
    {
        Key32 k = default;
        // A label of its own: the tag key reveals nothing about the X25519 private key it comes from.
        HMACSHA256.HashData(priv, "veil invite token key"u8, k);
        return k;
    }

    internal void Clear() { _tokenKey.Clear(); Psk.Clear(); foreach (Pending p in _pending.Values) { p.Token.Secret.Clear(); p.PeerSecret.Clear(); } }

    internal const string FileHeader = "# veil: pending invites, rewritten by the daemon; each token holds its secret: keep this file 0600\n";

    /// <summary>The invites file's text: one line per invite not yet expired, "invite TOKEN NAME|-
    /// JOINER-KEY|- [isolated]" (the key of a joiner written into the config; one only joining starts over).</summary>
    internal string Snapshot(long nowUnix)
    {
        var sb = new StringBuilder(FileHeader);
        foreach (Pending p in _pending.Values)
            if (p.Token.ExpiresUnix > nowUnix)
                sb.Append("invite ").Append(p.Token.Encode()).Append(' ').Append(p.Name.Length > 0 ? p.Name : "-").Append(' ')
                  .Append(p.Written ? p.JoinerKey.ToBase64() : "-").Append(p.Isolated ? " isolated\n" : "\n");
        return sb.ToString();
    }

    /// <summary>Takes Snapshot's text back at start-up: null, or why nothing of it was used. Only
    /// tokens this node minted count: a file from another node, or from before the key changed, is refused.</summary>
    internal string? Load(string text, long nowUnix, out int restored)
    {
        restored = 0;
        var found = new List<Pending>();
        byte[] tag = new byte[InviteToken.TagLen];
        string[] lines = text.Split('\n');
        string? error = null;
        for (int i = 0; i < lines.Length && error == null; i++)
        {
            string[] f = lines[i].Trim().Split(' ');
            if (f[0].Length == 0 || f[0][0] == '#') continue;
            Key32 joiner = default;
            InviteToken? t = (f.Length == 4 || f.Length == 5 && f[4] == "isolated") && f[0] == "invite" ? InviteToken.Parse(f[1]) : null;
            if (t == null || (f[2] != "-" && !UpConfig.IsName(f[2])) || (f[3] != "-" && !Key32.TryParseBase64(f[3], out joiner)))
                error = $"line {i + 1} is not 'invite TOKEN NAME|- KEY|- [isolated]'";
            else
            {
                InviteToken.MakeTag(_tokenKey, t.Body(withSecret: true), tag);
                if (!CryptographicOperations.FixedTimeEquals(tag, t.Tag)) error = $"line {i + 1} holds an invite this node's key did not make";
                else if (t.ExpiresUnix > nowUnix) found.Add(new Pending { Token = t, Name = f[2] == "-" ? "" : f[2], JoinerKey = joiner, Written = f[3] != "-", Isolated = f.Length == 5 });
                if (error != null || t.ExpiresUnix <= nowUnix) t.Secret.Clear();
            }
        }
        if (error == null && found.Count + _pending.Count > MaxPending) error = $"more than {MaxPending} invites";
        if (error != null)
        {
            foreach (Pending p in found) p.Token.Secret.Clear();
            return error;
        }
        foreach (Pending p in found) _pending[p.Token.Id] = p;
        restored = found.Count;
        return null;
    }

    /// <summary>`veil invite --list`: one line per invite not yet expired.</summary>
    internal string List(long nowUnix)
    {
        var sb = new StringBuilder();
        foreach (var (id, p) in _pending)
        {
            if (p.Token.ExpiresUnix <= nowUnix) continue;
            sb.Append($"{id:x16}  {p.Token.JoinerAddress,-18}  {(p.Name.Length > 0 ? p.Name : "-"),-16}  ")
              .Append(p.JoinerKey.IsZero() ? "pending" : p.Written ? "joined" : "joining").Append(p.Isolated ? "  isolated" : "").Append("  expires in ").Append(StatusView.Age((p.Token.ExpiresUnix - nowUnix) * 1000)).Append('\n');
        }
        return sb.Length > 0 ? sb.ToString() : "no pending invites\n";
    }

    /// <summary>`veil invite --revoke ID`: the token stops working and its address is free again.
    /// One already used is a member now: that is `veil revoke`'s job.</summary>
    internal string Revoke(string idText)
    {
        if (!ulong.TryParse(idText, System.Globalization.NumberStyles.AllowHexSpecifier, null, out ulong id) || !_pending.TryGetValue(id, out Pending? p))
            return $"error: no invite {idText} (see veil invite --list)\n";
        if (!p.JoinerKey.IsZero()) return $"error: invite {idText} was used already; remove the peer from the config, or 'veil revoke' its key\n";
        p.Token.Secret.Clear();
        p.PeerSecret.Clear();
        _pending.Remove(id);
        return $"ok: invite {id:x16} revoked\n";
    }

    internal InviteToken Create(in Key32 inviterPublic, string endpoint, string networkName, IfAddress inviterAddress,
        IfAddress joinerAddress, string joinerName, long expiresUnix, string inviterName = "", bool isolated = false)
    {
        long now = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        List<ulong> stale = new();
        foreach (var (id, p) in _pending) if (p.Token.ExpiresUnix <= now) stale.Add(id);
        // Expired invites are dropped first, so MaxPending counts only invites that can still be used.
        foreach (ulong id in stale) { _pending[id].Token.Secret.Clear(); _pending[id].PeerSecret.Clear(); _pending.Remove(id); }
        if (_pending.Count >= MaxPending) throw new ConfigException($"{MaxPending} invites are pending already; let some expire first");
        if (Encoding.UTF8.GetByteCount(endpoint) > 255 || Encoding.UTF8.GetByteCount(networkName) > 255)
            throw new ConfigException("the endpoint and the network name take at most 255 bytes each");
        if (inviterName.Length > 0 && !UpConfig.IsName(inviterName)) inviterName = "";   // the joiner then says NETWORK-inviter
        if (joinerName.Length > 0 && !UpConfig.IsName(joinerName))
            throw new ConfigException($"the joiner's name '{joinerName}' must be 1 to 32 letters, digits, '-', '_' or '.'");
        var t = new InviteToken
        {
            // Random, not counted: an id says nothing about how many invites exist and cannot be guessed.
            Id = BinaryPrimitives.ReadUInt64LittleEndian(RandomNumberGenerator.GetBytes(8)),
            ExpiresUnix = expiresUnix, InviterKey = inviterPublic, Endpoint = endpoint, NetworkName = networkName, InviterName = inviterName,
            Network = new IpPrefix(inviterAddress.Address.GetAddressBytes(), inviterAddress.Bits),
            // The joiner's config routes only the inviter's host address to it (Join's allowed_ips).
            JoinerAddress = joinerAddress, InviterAddress = new IfAddress(inviterAddress.Address, inviterAddress.IsV6 ? 128 : 32),
        };
        RandomNumberGenerator.Fill(t.Secret);
        InviteToken.MakeTag(_tokenKey, t.Body(withSecret: true), t.Tag);
        _pending[t.Id] = new Pending { Token = t, Name = joinerName, Isolated = isolated };
        return t;
    }

    internal IEnumerable<IPAddress> ReservedAddresses()
    {
        foreach (Pending p in _pending.Values) yield return p.Token.JoinerAddress.Address;
    }

    /// <summary>Checks a JoinHello: null when refused; for a joiner seen first, queues it (Joiners)
    /// and returns an empty answer (it is answered once written down); for one written down, the
    /// JoinAccept again (a retransmitted JoinHello).</summary>
    internal byte[]? Consume(ReadOnlySpan<byte> msg, Log log, in Endpoint from)
    {
        // 16 03 03 LL LL | 4 | body length (2) | token body without secret, with tag | joiner key (32) | proof (16) | name length + name
        // Lengths are checked before each field is read; a message that fails gets no answer at all.
        if (msg.Length < 8 || msg[5] != TypeJoinHello) return null;
        int bodyLen = BinaryPrimitives.ReadUInt16BigEndian(msg[6..]);
        int at = 8 + bodyLen;
        if (at + 32 + JoinProofLen + 1 > msg.Length) return null;
        InviteToken? claimed = InviteToken.Decode(msg.Slice(8, bodyLen), tagged: true);
        if (claimed == null || !_pending.TryGetValue(claimed.Id, out Pending? p)) return Refuse(log, from, "unknown_invite");
        ReadOnlySpan<byte> joinerKey = msg.Slice(at, 32);
        ReadOnlySpan<byte> proof = msg.Slice(at + 32, JoinProofLen);
        int nameLen = msg[at + 32 + JoinProofLen];
        if (at + 32 + JoinProofLen + 1 + nameLen != msg.Length) return null;
        // The claimed fields with our secret put back must give our tag: nothing was forged or altered.
        claimed.Secret = p.Token.Secret;
        Span<byte> tag = stackalloc byte[InviteToken.TagLen];
        InviteToken.MakeTag(_tokenKey, claimed.Body(withSecret: true), tag);
        Span<byte> expectProof = stackalloc byte[JoinProofLen];
        InviteToken.JoinProof(p.Token.Secret, p.Token.Id, joinerKey, expectProof);
        if (!CryptographicOperations.FixedTimeEquals(tag, claimed.Tag) || !CryptographicOperations.FixedTimeEquals(tag, p.Token.Tag) ||
            !CryptographicOperations.FixedTimeEquals(proof, expectProof))
            return Refuse(log, from, "bad_token");
        // Expiry and use are judged only after the tag and proof: until then nothing in the message is
        // trusted. The expiry is the inviter's clock, whatever the joiner's says.
        if (p.Token.ExpiresUnix <= DateTimeOffset.UtcNow.ToUnixTimeSeconds()) return Refuse(log, from, "expired");
        // The first valid key owns the invite; the same key again is a retransmit (UDP lost the answer) and
        // gets the same JoinAccept, so joining is idempotent.
        if (!p.JoinerKey.IsZero() && !CryptographicOperations.FixedTimeEquals(p.JoinerKey, joinerKey)) return Refuse(log, from, "already_used");
        if (p.JoinerKey.IsZero())
        {
            // The name the inviter gave the invite wins over the one the joiner asks for (its hostname);
            // a name the config would refuse falls back to the key's default ("").
            string asked = nameLen > 0 ? Encoding.UTF8.GetString(msg.Slice(at + 32 + JoinProofLen + 1, nameLen)) : "";
            // A guest (--isolated) does not name itself: a name is what rules and patterns match.
            string name = p.Name.Length > 0 ? p.Name : UpConfig.IsName(asked) && !p.Isolated ? asked : "";
            var pc = new PeerConfig { Name = name, NameGiven = name.Length > 0, Isolated = p.Isolated };
            joinerKey.CopyTo(pc.PublicKey);
            // An isolated joiner gets a secret of its own: with the network's it could come back under
            // another key as a full member. The daemon writes it to a file its [[peer]] names.
            if (p.Isolated)
            {
                RandomNumberGenerator.Fill(p.PeerSecret);
                pc.Psk = p.PeerSecret;
                pc.PskFile = $"peer-{p.Token.Id:x16}.psk";              // the invite's: unique, and no key can aim at another's
            }
            pc.Allowed.Add(p.Token.JoinerAddress.Host);
            joinerKey.CopyTo(p.JoinerKey);                // the invite is this key's from now on
            Joiners.Enqueue(new Joiner(p.Token.Id, pc, from));
            // Empty: queued, not yet answered. The joiner hears yes only once the config that admits it is
            // on disk (Written), so an accepted joiner survives the inviter's restart.
            return [];
        }
        // An isolated joiner's secret is in memory only until our restart; a retransmit after it is
        // answered with the secret its [[peer]] holds now (none: it needs a new invite).
        if (p.Written && p.Isolated && p.PeerSecret.IsZero())
        {
            if (OwnSecretOf?.Invoke(p.JoinerKey) is not Key32 own) return Refuse(log, from, "answered_before_restart");
            p.PeerSecret = own;
        }
        return p.Written ? Accept(p, joinerKey) : [];
    }

    /// <summary>The daemon wrote the joiner down (error empty) or could not: the JoinAccept to send,
    /// or null, and the invite free again for another try.</summary>
    internal byte[]? Written(Joiner j, string error, Log log)
    {
        if (!_pending.TryGetValue(j.InviteId, out Pending? p) || !CryptographicOperations.FixedTimeEquals(p.JoinerKey, j.Peer.PublicKey)) return null;
        if (error.Length > 0)
        {
            log.Warn("join_failed", $"invite={j.InviteId:x16} error=\"{error}\"");
            // The invite is free again: the joiner's retransmits, or another try, can still use it.
            p.JoinerKey.Clear();
            p.PeerSecret.Clear();
            return null;
        }
        p.Written = true;
        // The whole key, unlike other lines: a joiner is an identity the operator audits, and the
        // peer_joined hook (OpenWrt's writes it into UCI) needs it.
        log.Info("peer_joined", $"invite={j.InviteId:x16} peer={(j.Peer.Name.Length > 0 ? j.Peer.Name : j.Peer.PublicKey.DefaultName())} public_key={j.Peer.PublicKey.ToBase64()} allowed_ips={j.Peer.Allowed[0]} isolated={(j.Peer.Isolated ? "true" : "false")}{(j.Peer.PskFile.Length > 0 ? " psk_file=" + j.Peer.PskFile : "")} from={j.From}");
        return Accept(p, j.Peer.PublicKey);
    }

    // The JoinAccept: the network secret, sealed with a key only the token's holder can derive.
    private byte[] Accept(Pending p, ReadOnlySpan<byte> joinerKey)
    {
        byte[] reply = new byte[Spec.PreambleLen + 1 + 8 + JoinAcceptPayloadLen + Spec.TagLen];
        // The key is this invite's alone (derived from its secret), so the fixed zero nonce never meets a
        // second key; the joiner's key is the AAD, binding the answer to the key that used the invite.
        Wire.WritePreamble(reply, Spec.TlsHandshake, reply.Length);
        reply[5] = TypeJoinAccept;
        BinaryPrimitives.WriteUInt64BigEndian(reply.AsSpan(6), p.Token.Id);
        Span<byte> payload = stackalloc byte[JoinAcceptPayloadLen];
        if (p.Isolated) ((ReadOnlySpan<byte>)p.PeerSecret).CopyTo(payload);
        else ((ReadOnlySpan<byte>)Psk).CopyTo(payload);
        payload[32] = 1;
        Key32 key = default;
        InviteToken.AcceptKey(p.Token.Secret, key);
        using (var aead = new Aead(AeadKind.ChaCha20Poly1305, key)) aead.Seal(new byte[Spec.NonceLen], payload, joinerKey, reply.AsSpan(14));
        key.Clear();
        CryptographicOperations.ZeroMemory(payload);
        return reply;
    }

    private static byte[]? Refuse(Log log, in Endpoint from, string reason)
    {
        // Anyone on the internet can send a JoinHello: the line is rate-limited and nothing is answered.
        if (log.Wants(LogLevel.Warn, "join_refused")) log.Emit(LogLevel.Warn, "join_refused", $"reason={reason} from={from}");
        return null;
    }
}

/// <summary>The CLI verbs of onboarding. Files are written whole (temp + rename), keys with mode 0600.</summary>
internal static class Onboarding
{
    // Temp file and rename: a crash or a full disk leaves the old file or the new one, never half of
    // one. The pid keeps two writers apart, CreateNew refuses a file (or symlink) already at tmp, and
    // the mode is set before the first byte of text is written.
    internal static void WriteAtomic(string path, string text, UnixFileMode mode)
    {
        string tmp = path + ".tmp-" + Environment.ProcessId;
        try
        {
            using (var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None, 4096, FileOptions.None))
            {
                File.SetUnixFileMode(tmp, mode);
                byte[] b = Encoding.UTF8.GetBytes(text);
                fs.Write(b);
                fs.Flush(flushToDisk: true);
            }
            File.Move(tmp, path, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            try { File.Delete(tmp); } catch (IOException) { } catch (UnauthorizedAccessException) { }
            throw new ConfigException($"cannot write '{path}' (disk full or read-only?); nothing was changed");
        }
    }

    // A TOML basic string, as TomlDoc reads it back.
    private static string Q(string s) => "\"" + s.Replace("\\", "\\\\").Replace("\"", "\\\"") + "\"";

    internal static string PeerToml(PeerConfig p)
    {
        var sb = new StringBuilder("\n[[peer]]\n");
        if (p.Name.Length > 0) sb.Append("name = ").Append(Q(p.Name)).Append('\n');   // none: the key's default name
        sb.Append("public_key = ").Append(Q(p.PublicKey.ToBase64())).Append('\n');
        if (p.EndpointText.Length > 0) sb.Append("endpoint = ").Append(Q(p.EndpointText)).Append('\n');
        sb.Append("allowed_ips = [").Append(string.Join(", ", p.Allowed.ConvertAll(a => Q(a.ToString())))).Append("]\n");
        if (p.KeepaliveMs >= 0) sb.Append("keepalive = ").Append(p.KeepaliveMs / 1000).Append('\n');
        if (p.Isolated) sb.Append("isolated = true\n");
        if (p.PskFile.Length > 0) sb.Append("psk = ").Append(Q(p.PskFile)).Append('\n');
        return sb.ToString();
    }

    /// <summary>Appends a peer to a config file after checking that the result still loads.</summary>
    internal static void AppendPeer(string configPath, PeerConfig p)
    {
        string old = File.Exists(configPath) ? File.ReadAllText(configPath) : throw new ConfigException($"--config '{configPath}': no such file");
        string next = old + (old.EndsWith('\n') || old.Length == 0 ? "" : "\n") + PeerToml(p);
        TomlDoc doc = TomlDoc.Parse(next, Path.GetFileName(configPath));
        if (doc.TableArrays.TryGetValue("peer", out var peers))
            foreach (var t in peers)
                // The new text is parsed before it is written: a peer that would break the file never reaches it.
                if (t.TryGetValue("public_key", out TomlValue? k) && k.Str == p.PublicKey.ToBase64() && t != peers[^1])
                    throw new ConfigException($"peer {p.PublicKey.Short()} is already in {configPath}");
        WriteAtomic(configPath, next, File.GetUnixFileMode(configPath));   // keep who may read it
    }
}

internal static class OnboardingCli
{
    internal static string? Arg(string[] args, string flag, ref int i) =>
        args[i] == flag && i + 1 < args.Length ? args[++i] : args[i].StartsWith(flag + "=") ? args[i][(flag.Length + 1)..] : null;

    private static long ParseDuration(string v)
    {
        // Seconds, as the token's expiry is Unix seconds; the bound keeps n * 86400 far from overflow.
        if (v.Length >= 2 && long.TryParse(v[..^1], System.Globalization.NumberStyles.None, null, out long n) && n > 0 && n < 1_000_000)
            switch (v[^1]) { case 's': return n; case 'm': return n * 60; case 'h': return n * 3600; case 'd': return n * 86400; }
        throw new ConfigException($"--expires '{v}' must be a number with s, m, h or d (e.g. 1h)");
    }

    /// <summary>veil init [--dir DIR] [--address CIDR] [--listen ADDR:PORT]</summary>
    internal static int Init(string[] args, TextWriter o)
    {
        // 100.64.0.0/10 is RFC 6598 shared space: it seldom collides with a home or office LAN.
        string dir = "/etc/veil", address = "100.64.0.1/24", listen = "0.0.0.0:51820";
        for (int i = 1; i < args.Length; i++)
        {
            if (Arg(args, "--dir", ref i) is string d) dir = d;
            else if (Arg(args, "--address", ref i) is string a) address = IfAddress.TryParse(a, out _) ? a : throw new ConfigException($"--address '{a}' is not an address with a prefix length");
            else if (Arg(args, "--listen", ref i) is string l) listen = Endpoint.TrySplitHostPort(l, out _, out _) ? l : throw new ConfigException($"--listen '{l}' must be ADDRESS:PORT");
            else throw new ConfigException($"init: unknown argument '{args[i]}' (see 'veil help init')");
        }
        // Absolute: a relative path in the file would be read relative to the file (UpConfig.FromFile).
        string keyPath = Path.GetFullPath(Path.Combine(dir, "private.key")), cfgPath = Path.Combine(dir, "veil.toml");
        if (File.Exists(keyPath)) throw new ConfigException($"'{keyPath}' exists: this node already has an identity (it is never overwritten)");
        if (File.Exists(cfgPath)) throw new ConfigException($"'{cfgPath}' exists; remove it or use another --dir");
        Directory.CreateDirectory(dir);
        // The directory holds the node's identity: 0700 even if it existed, before the key is written.
        File.SetUnixFileMode(dir, (UnixFileMode)0b111_000_000);
        Key32 priv = default, pub = default;
        X25519.GeneratePrivateKey(priv);
        X25519.PublicKey(pub, priv);
        // The key first: a config never names a key file that does not exist.
        Onboarding.WriteAtomic(keyPath, priv.ToBase64() + "\n", (UnixFileMode)0b110_000_000);
        priv.Clear();
        Onboarding.WriteAtomic(cfgPath, $"# written by veil init; every key is described in veil.toml.example\nkey = \"{keyPath}\"\nlisten = \"{listen}\"\naddress = [\"{address}\"]\n", (UnixFileMode)0b110_000_000);
        o.WriteLine($"public key: {pub.ToBase64()}");
        o.WriteLine($"wrote {keyPath} (0600) and {cfgPath}");
        o.WriteLine($"start:  veil up --config {cfgPath}");
        return 0;
    }

    /// <summary>veil revoke PUBKEY --admin-key FILE [--control PATH] [--print]: signs a revocation
    /// and hands it to the running node (which passes it on), or prints it for the revocations file.</summary>
    internal static int Revoke(string[] args, TextWriter o, TextWriter e)
    {
        string control = Tune.DefaultControlPath, adminFile = "";
        bool print = false;
        Key32 key = default;
        bool haveKey = false;
        for (int i = 1; i < args.Length; i++)
        {
            if (Arg(args, "--admin-key", ref i) is string f) adminFile = f;
            else if (Arg(args, "--control", ref i) is string c) control = c;
            else if (args[i] == "--print") print = true;
            else if (!haveKey && !args[i].StartsWith("--") && Key32.TryParseBase64(args[i], out key)) haveKey = true;
            else throw new ConfigException($"revoke: unknown argument '{args[i]}' (see 'veil help revoke')");
        }
        if (!haveKey) throw new ConfigException("revoke: name the member's base64 public key");
        if (adminFile.Length == 0) throw new ConfigException("revoke: --admin-key FILE is required (the network's admin key, from 'veil genadmin')");
        byte[] admin;
        // The admin key can end any member: read with the same 0600 check as a node key, zeroed after use.
        try { admin = Convert.FromBase64String(UpConfig.ReadSecretFile("--admin-key", adminFile).Trim()); }
        catch (FormatException) { throw new ConfigException($"--admin-key '{adminFile}' does not hold a base64 admin key"); }
        if (AdminSignature.PublicKeyOf(admin) == null) throw new ConfigException($"--admin-key '{adminFile}' does not hold an admin key (the base64 line 'veil genadmin' prints)");
        Revocation r = Revocation.Create(admin, key, DateTimeOffset.UtcNow.ToUnixTimeSeconds());
        CryptographicOperations.ZeroMemory(admin);
        if (print) { o.WriteLine(r.Encode()); return 0; }
        string? reply = ControlClient.Ask(control, "revoke " + r.Encode());
        if (reply == null) { e.WriteLine($"veil: no daemon answers on {control} (use --print to write the revocation down instead)"); return 1; }
        if (reply.StartsWith("error:")) { e.Write("veil: " + reply[6..].TrimStart()); return 2; }
        o.Write(reply[3..].TrimStart());
        return 0;
    }

    /// <summary>veil invite [--expires 1h] [--name NAME] [--endpoint HOST:PORT] [--network NAME] [--control PATH]</summary>
    internal static int Invite(string[] args, TextWriter o, TextWriter e)
    {
        string control = Tune.DefaultControlPath, name = "-", endpoint = "-", network = "veil";
        string? request = null;
        long expires = 3600;
        bool isolated = false;
        for (int i = 1; i < args.Length; i++)
        {
            if (args[i] == "--list") request = "invites";
            else if (args[i] == "--isolated") isolated = true;
            else if (Arg(args, "--revoke", ref i) is string id) request = "invites revoke " + id;
            else if (Arg(args, "--expires", ref i) is string x) expires = ParseDuration(x);
            else if (Arg(args, "--name", ref i) is string n) name = n;
            else if (Arg(args, "--endpoint", ref i) is string ep) endpoint = Endpoint.TrySplitHostPort(ep, out _, out _) ? ep : throw new ConfigException($"--endpoint '{ep}' must be HOST:PORT");
            else if (Arg(args, "--network", ref i) is string nw) network = nw;
            else if (Arg(args, "--control", ref i) is string c) control = c;
            else throw new ConfigException($"invite: unknown argument '{args[i]}' (see 'veil help invite')");
        }
        // The control request is one space-separated line ("-" for a value not given), so a space would
        // shift the fields; the network name travels in the token.
        if (name.Contains(' ') || network.Contains(' ') || network.Length > 32) throw new ConfigException("invite: --name and --network take one word of at most 32 characters");
        string? reply = ControlClient.Ask(control, request ?? $"invite {expires} {name} {endpoint} {network}" + (isolated ? " isolated" : ""));
        if (reply == null) { e.WriteLine($"veil: no daemon answers on {control} (invites are issued by the running node)"); return 1; }
        if (reply.StartsWith("error: ")) { e.Write("veil: " + reply[7..]); return 2; }
        if (request == null && !reply.StartsWith("ok: ")) { e.Write("veil: " + reply); return 2; }
        o.Write(reply.StartsWith("ok: ") && request == null ? reply[4..] : reply);
        return 0;
    }

    /// <summary>veil join TOKEN [--dir DIR] [--name NAME] [--listen ADDR:PORT]</summary>
    internal static unsafe int Join(string[] args, TextWriter o, TextWriter e)
    {
        if (args.Length < 2) throw new ConfigException("join needs the token printed by 'veil invite'");
        InviteToken t = InviteToken.Parse(args[1]) ?? throw new ConfigException(InviteToken.OtherVersion(args[1])
            ? "join: this token was made by another version of veil; ask for a new one with this version's 'veil invite'"
            : "join: that is not a Veil invite token (it starts with veil1-)");
        string dir = "/etc/veil", name = Environment.MachineName, listen = "0.0.0.0:51820";
        for (int i = 2; i < args.Length; i++)
        {
            if (Arg(args, "--dir", ref i) is string d) dir = d;
            else if (Arg(args, "--name", ref i) is string n) name = n;
            else if (Arg(args, "--listen", ref i) is string l) listen = Endpoint.TrySplitHostPort(l, out _, out _) ? l : throw new ConfigException($"--listen '{l}' must be ADDRESS:PORT");
            else throw new ConfigException($"join: unknown argument '{args[i]}' (see 'veil help join')");
        }
        name = UpConfig.MendName(name);
        // Only a courtesy, to fail before any file is written; the inviter's own clock decides.
        if (t.ExpiresUnix <= DateTimeOffset.UtcNow.ToUnixTimeSeconds()) throw new ConfigException("join: this invite has expired; ask for a new one");
        string keyPath = Path.GetFullPath(Path.Combine(dir, "private.key")), cfgPath = Path.Combine(dir, "veil.toml"), pskPath = Path.GetFullPath(Path.Combine(dir, "network.psk"));
        if (File.Exists(cfgPath)) throw new ConfigException($"'{cfgPath}' exists; join into an empty --dir");
        Directory.CreateDirectory(dir);
        Key32 priv, pub = default;
        // An existing key (from `veil init`) is kept: an identity is never replaced behind the user's back.
        if (File.Exists(keyPath)) priv = UpConfig.ReadKeyFile("--dir key", keyPath);
        else
        {
            priv = default;
            X25519.GeneratePrivateKey(priv);
            Onboarding.WriteAtomic(keyPath, priv.ToBase64() + "\n", (UnixFileMode)0b110_000_000);
        }
        X25519.PublicKey(pub, priv);
        priv.Clear();
        if (!Endpoint.TrySplitHostPort(t.Endpoint, out string host, out int port)) throw new ConfigException("join: the token's endpoint is malformed");
        IPAddress ip = IPAddress.TryParse(host, out IPAddress? lit) ? lit
            : Dns.GetHostAddresses(host) is { Length: > 0 } found ? found[0] : throw new ConfigException($"join: cannot resolve '{host}'");
        // JoinHello: the token without its secret, our key, the proof, our name.
        byte[] body = t.Body(withSecret: false);
        byte[] nameBytes = Encoding.UTF8.GetBytes(name);
        byte[] hello = new byte[8 + body.Length + InviteToken.TagLen + 32 + Invites.JoinProofLen + 1 + nameBytes.Length];
        Wire.WritePreamble(hello, Spec.TlsHandshake, hello.Length);
        hello[5] = Invites.TypeJoinHello;
        BinaryPrimitives.WriteUInt16BigEndian(hello.AsSpan(6), (ushort)(body.Length + InviteToken.TagLen));
        body.CopyTo(hello, 8);
        t.Tag.CopyTo(hello, 8 + body.Length);
        int at = 8 + body.Length + InviteToken.TagLen;
        ((ReadOnlySpan<byte>)pub).CopyTo(hello.AsSpan(at));
        InviteToken.JoinProof(t.Secret, t.Id, pub, hello.AsSpan(at + 32, Invites.JoinProofLen));
        hello[at + 32 + Invites.JoinProofLen] = (byte)nameBytes.Length;
        nameBytes.CopyTo(hello, at + 33 + Invites.JoinProofLen);
        using var sock = new Socket(ip.AddressFamily, SocketType.Dgram, ProtocolType.Udp) { ReceiveTimeout = 1500 };
        var to = new IPEndPoint(ip, port);
        byte[] reply = new byte[256];
        Key32 psk = default;
        bool accepted = false;
        // The inviter answers once it has written us into its config file and reloaded (names in
        // that file resolve then): seconds on a slow router, so ask for 12 s before giving up.
        for (int attempt = 0; attempt < 8 && !accepted; attempt++)
        {
            sock.SendTo(hello, to);
            try
            {
                int n = sock.Receive(reply);
                accepted = OpenAccept(reply.AsSpan(0, n), t, pub, ref psk);
            }
            catch (SocketException) { }
        }
        if (!accepted) { e.WriteLine($"veil: {t.Endpoint} did not accept the invite (expired, used, or the inviter is not running)"); return 1; }
        var sb = new StringBuilder("# written by veil join; every key is described in veil.toml.example\n");
        sb.Append($"key = \"{keyPath}\"\n");
        // A zero secret means the inviter runs without --psk (Noise's all-zero psk): no psk line then.
        if (!psk.IsZero())
        {
            Onboarding.WriteAtomic(pskPath, psk.ToBase64() + "\n", (UnixFileMode)0b110_000_000);
            sb.Append($"psk = \"{pskPath}\"\n");
        }
        psk.Clear();
        sb.Append($"listen = \"{listen}\"\naddress = [\"{t.JoinerAddress}\"]\n");
        // A joiner is often behind NAT: its keepalive keeps the mapping open so the inviter can reach it.
        var inviter = new PeerConfig { Name = t.InviterPeerName(), PublicKey = t.InviterKey, EndpointText = t.Endpoint, KeepaliveMs = Tune.JoinerKeepaliveMs };
        inviter.Allowed.Add(new IpPrefix(t.InviterAddress.Address.GetAddressBytes(), t.InviterAddress.Bits));
        sb.Append(Onboarding.PeerToml(inviter));
        Onboarding.WriteAtomic(cfgPath, sb.ToString(), (UnixFileMode)0b110_000_000);
        o.WriteLine($"joined network '{t.NetworkName}' as {t.JoinerAddress}; public key {pub.ToBase64()}");
        o.WriteLine($"wrote {cfgPath}; start:  veil up --config {cfgPath}");
        return 0;
    }

    private static bool OpenAccept(ReadOnlySpan<byte> r, InviteToken t, in Key32 pub, ref Key32 psk)
    {
        int len = Spec.PreambleLen + 1 + 8 + Invites.JoinAcceptPayloadLen + Spec.TagLen;
        // Shape and invite id first, so a stray datagram costs no crypto; only the token's holder and the
        // inviter can derive the key that opens the rest.
        if (r.Length != len || r[0] != Spec.TlsHandshake || r[5] != Invites.TypeJoinAccept || BinaryPrimitives.ReadUInt64BigEndian(r[6..]) != t.Id) return false;
        Key32 key = default;
        InviteToken.AcceptKey(t.Secret, key);
        Span<byte> payload = stackalloc byte[Invites.JoinAcceptPayloadLen];
        using var aead = new Aead(AeadKind.ChaCha20Poly1305, key);
        bool ok = aead.Open(new byte[Spec.NonceLen], r[14..], pub, payload) && payload[32] == 1;
        key.Clear();
        if (ok) payload[..32].CopyTo(psk);
        CryptographicOperations.ZeroMemory(payload);
        return ok;
    }

    /// <summary>veil add-peer --config FILE --peer PUBKEY[@HOST:PORT] [--allow CIDR]... [--name NAME] [--keepalive S]</summary>
    internal static int AddPeer(string[] args, TextWriter o)
    {
        string? config = null;
        var peerArgs = new List<string> { "up" };
        string? name = null;
        for (int i = 1; i < args.Length; i++)
        {
            if (Arg(args, "--config", ref i) is string c) config = c;
            else if (Arg(args, "--name", ref i) is string n) name = n;
            else if (args[i] is "--peer" or "--allow" or "--keepalive" && i + 1 < args.Length) { peerArgs.Add(args[i]); peerArgs.Add(args[++i]); }
            else throw new ConfigException($"add-peer: unknown argument '{args[i]}' (see 'veil help add-peer')");
        }
        if (config == null) throw new ConfigException("add-peer needs --config FILE (the file the daemon runs with)");
        if (!peerArgs.Contains("--peer")) throw new ConfigException("add-peer needs --peer PUBKEY[@HOST:PORT]");
        // Loaded twice: as it is (for the duplicate check, since a flag peer would replace the file's peer
        // of the same key) and with the new peer's flags, which validates them exactly as `up` would.
        UpConfig current = UpConfig.Load(new[] { "up", "--config", config }, 1);
        UpConfig parsed = UpConfig.Load([.. peerArgs, "--config", config], 1);   // validates like `up` would
        PeerConfig p = parsed.Peers[^1];
        if (current.Peers.Exists(x => x.PublicKey.EqualsCt(p.PublicKey))) throw new ConfigException($"peer {p.PublicKey.Short()} is already in {config}");
        if (name != null && !UpConfig.IsName(name)) throw new ConfigException($"add-peer: --name '{name}' must be 1 to 32 letters, digits, '-', '_' or '.'");
        if (name != null) p.Name = name;
        int ka = peerArgs.IndexOf("--keepalive");
        if (ka > 0) p.KeepaliveMs = parsed.PersistentKeepaliveMs;
        string before = File.ReadAllText(config);
        Onboarding.AppendPeer(config, p);
        // The file must load as the daemon will on reload (peer count, names); if not, the old text goes back.
        try { UpConfig.Load(new[] { "up", "--config", config }, 1); }
        catch (ConfigException)
        {
            Onboarding.WriteAtomic(config, before, File.GetUnixFileMode(config));
            throw;
        }
        foreach (string w in UpConfig.Load(new[] { "up", "--config", config }, 1).AllowedWarnings()) o.WriteLine("warning: " + w);
        o.WriteLine($"added peer {p.Name} to {config}; apply with: veil reload");
        return 0;
    }
}

/// <summary>veil doctor [the flags of up]: one pass/fail line per check; exit 1 if any failed.</summary>
internal static unsafe partial class Doctor
{
    [LibraryImport("libc", EntryPoint = "geteuid")] private static partial uint GetEuid();

    internal static int Run(string[] args, TextWriter o)
    {
        int failed = 0;
        void Line(bool ok, string what, string detail)
        {
            o.WriteLine($"{(ok ? "ok  " : "FAIL")} {what}: {detail}");
            if (!ok) failed++;
        }
        UpConfig? cfg = null;
        try
        {
            cfg = UpConfig.Load(args, 1);
            Line(true, "config", $"{(cfg.ConfigPath ?? "flags")} is valid ({cfg.Peers.Count} peers; key file mode 0600)");
        }
        catch (ConfigException e) { Line(false, "config", e.Message); }

        bool tun = File.Exists("/dev/net/tun");
        int fd = -1;
        if (tun)
        {
            byte* path = stackalloc byte[16];
            Encoding.ASCII.GetBytes("/dev/net/tun\0", new Span<byte>(path, 16));
            fd = Libc.Open(path, Libc.O_RDWR | Libc.O_CLOEXEC, 0);
            if (fd >= 0) Libc.Close(fd);
        }
        Line(tun && fd >= 0, "tun", !tun ? "/dev/net/tun is missing: load the tun module (modprobe tun; OpenWrt: apk add kmod-tun / opkg install kmod-tun)"
            : fd < 0 ? $"/dev/net/tun cannot be opened: {Libc.ErrorText(Libc.Errno)}" : "/dev/net/tun opens" + (Directory.Exists("/sys/module/tun") ? " (tun module loaded)" : ""));

        bool admin = GetEuid() == 0 || HasCapNetAdmin();
        Line(admin, "privileges", admin ? "root or CAP_NET_ADMIN" : "neither root nor CAP_NET_ADMIN: veil cannot create its interface");

        if (cfg != null)
        {
            int? live = ControlClient.TryConnect(cfg.ControlPath);
            if (live is int c) Libc.Close(c);
            // The port's user is the running veil, not a conflict, when its control socket answers or
            // the process holding the port is a veil (one started with another --control).
            bool free = PortFree(cfg.ListenAddress, cfg.ListenPort);
            string? owner = free ? null : PortOwner(cfg.ListenPort);
            bool ours = live != null || owner != null && owner.EndsWith("(veil)", StringComparison.Ordinal);
            Line(free || ours, "port", free ? $"udp {cfg.ListenPort} is free" : ours ? $"udp {cfg.ListenPort} is used by the running veil{(owner != null ? $", {owner}" : "")}"
                : $"udp {cfg.ListenPort} is in use by {owner ?? "another program"} (WireGuard also defaults to 51820): choose --listen");
            // A running daemon knows what no file says: whether its peers are up.
            if (live != null && ControlClient.Ask(cfg.ControlPath, "health") is string health)
                Line(health.StartsWith("ok:", StringComparison.Ordinal), "daemon", "running; " + health.TrimEnd('\n').Replace("ok: ", "").Replace("down: ", "") +
                    (health.StartsWith("ok:", StringComparison.Ordinal) ? "" : " ('veil status' says why: handshake attempts and the last failure)"));
            // What the daemon met installing its routes: the kernel's view, not the file's.
            if (live != null && ControlClient.Ask(cfg.ControlPath, "status") is string status)
                foreach (string line in status.Split('\n'))
                    if (line.Trim().StartsWith("warning: route conflict: ", StringComparison.Ordinal))
                        Line(false, "routes", line.Trim()["warning: route conflict: ".Length..] + (line.Contains("shadows ours", StringComparison.Ordinal)
                            ? " (see 'ip route get ADDRESS': a more specific or earlier route on that interface wins)"
                            : line.Contains("not Veil's", StringComparison.Ordinal) ? " (see 'ip route show PREFIX': delete or narrow that route, or give the peer another prefix)" : ""));
            bool subnets = cfg.Peers.Exists(p => p.Allowed.Exists(a => a.Bits < a.MaxBits));
            string rp = Sysctls.Read("/proc/sys/net/ipv4/conf/all/rp_filter");
            Line(rp != "1" || !subnets || cfg.FixRpFilter, "rp_filter", rp == "1" && subnets
                ? cfg.FixRpFilter ? "strict (1); --fix-rp-filter makes it loose (2) on the TUN alone"
                    : "strict (1) while peers route subnets: replies may be dropped; start with --fix-rp-filter, or set net.ipv4.conf.all.rp_filter=2"
                : $"{(rp.Length > 0 ? rp : "unknown")} ({(rp == "1" ? "strict, fine for host routes only" : "fine")})");
            string fwd = Sysctls.Read("/proc/sys/net/ipv4/ip_forward");
            Line(true, "ip_forward", fwd == "1" ? "on" : "off (needed only when this node forwards for a subnet behind it)");
            foreach (PeerConfig p in cfg.Peers)
            {
                if (!p.Endpoint.IsSet) continue;
                int path = Libc.PathMtu(p.Endpoint);
                int need = cfg.Mtu + Record.UnderlayOverheadLen(!p.Endpoint.IsV4);
                Line(path == 0 || need <= path, "mtu", path == 0 ? $"no route to {p.Name} at {p.Endpoint} yet"
                    : need <= path ? $"{cfg.Mtu} fits the path to {p.Name} (path MTU {path})"
                    : $"{cfg.Mtu} + {need - cfg.Mtu} bytes of overhead exceeds the path MTU {path} to {p.Name}: use --mtu {path - (need - cfg.Mtu)}");
            }
            foreach (string overlap in RouteOverlaps(cfg)) Line(false, "routes", overlap);
            if (RouteOverlaps(cfg).Count == 0) Line(true, "routes", "no allowed prefix collides with a route on another interface");
        }
        // A board without a battery-backed clock boots in 1970 (or at its build date) until NTP runs; no
        // Veil release predates 2025, so an earlier year is a clock not yet set. The TAI64N timestamp of a
        // ClientHello may then look older than the last one a peer accepted.
        int year = DateTime.UtcNow.Year;
        Line(year >= 2025, "clock", year >= 2025 ? $"{DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC" :
            $"the clock says {year}: not synchronised yet; peers may ignore our handshakes until it is (NTP)");
        o.WriteLine(failed == 0 ? "all checks passed" : $"{failed} check(s) failed");
        return failed == 0 ? 0 : 1;
    }

    /// <summary>What `doctor` would say about a failure of `veil up` to start, in a few words ("" if
    /// nothing): the tun module, the privileges, the port's owner.</summary>
    internal static string HintFor(string failure, UpConfig cfg)
    {
        if (failure.Contains("TUN '", StringComparison.Ordinal) || failure.Contains("/dev/net/tun", StringComparison.Ordinal))
        {
            if (!File.Exists("/dev/net/tun")) return "/dev/net/tun is missing: load the tun module (modprobe tun; OpenWrt: apk add kmod-tun / opkg install kmod-tun)";
            if (GetEuid() != 0 && !HasCapNetAdmin()) return "run it as root or with CAP_NET_ADMIN ('veil doctor' checks)";
        }
        if (failure.Contains("another process uses the port", StringComparison.Ordinal))
            return PortOwner(cfg.ListenPort) is string who ? $"udp {cfg.ListenPort} belongs to {who}; choose another with --listen" : "choose another port with --listen";
        return "";
    }

    /// <summary>"pid N (COMM)" of a process holding a UDP socket on port (from /proc), or null.</summary>
    internal static string? PortOwner(int port)
    {
        var inodes = new HashSet<string>();
        foreach (string table in new[] { "/proc/net/udp", "/proc/net/udp6" })
            foreach (string line in Sysctls.Read(table).Split('\n'))
            {
                // "sl local_address rem_address st ... uid timeout inode": local is HEXADDR:HEXPORT.
                string[] f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
                if (f.Length > 9 && f[1].Split(':') is [_, string hexPort] && int.TryParse(hexPort, System.Globalization.NumberStyles.AllowHexSpecifier, null, out int p) && p == port)
                    inodes.Add($"socket:[{f[9]}]");
            }
        if (inodes.Count == 0) return null;
        try
        {
            foreach (string dir in Directory.EnumerateDirectories("/proc"))
            {
                if (!int.TryParse(Path.GetFileName(dir), out int pid)) continue;
                try
                {
                    foreach (string fd in Directory.EnumerateFileSystemEntries(dir + "/fd"))
                        if (new FileInfo(fd).LinkTarget is string target && inodes.Contains(target))
                            return $"pid {pid} ({Sysctls.Read(dir + "/comm")})";
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }   // gone, or not ours to read
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
        return null;
    }

    private static bool HasCapNetAdmin()
    {
        foreach (string line in Sysctls.Read("/proc/self/status").Split('\n'))
            // CAP_NET_ADMIN is bit 12 of the effective set (linux/capability.h).
            if (line.StartsWith("CapEff:") && ulong.TryParse(line[7..].Trim(), System.Globalization.NumberStyles.HexNumber, null, out ulong caps))
                return (caps & (1UL << 12)) != 0;
        return false;
    }

    private static bool PortFree(IPAddress address, int port)
    {
        try
        {
            using UdpSocket s = UdpSocket.Bind(address, port);
            return true;
        }
        catch (IOException) { return false; }
    }

    /// <summary>Allowed prefixes equal to or inside an IPv4 route that leaves by another interface.</summary>
    internal static List<string> RouteOverlaps(UpConfig cfg)
    {
        var found = new List<string>();
        // IPv4 only: /proc/net/route has no IPv6 routes. Its first line is the column header.
        string[] lines = Sysctls.Read("/proc/net/route").Split('\n');
        foreach (string line in lines.Length > 1 ? lines[1..] : [])
        {
            string[] f = line.Split('\t', StringSplitOptions.RemoveEmptyEntries);
            if (f.Length < 8 || f[0] == cfg.TunName) continue;
            uint dst = Convert.ToUInt32(f[1], 16), mask = Convert.ToUInt32(f[7], 16);
            if (mask == 0) continue;                                   // the default route covers everything
            byte[] d = BitConverter.GetBytes(dst);                     // /proc prints network order as a host integer
            var route = new IpPrefix(d, System.Numerics.BitOperations.PopCount(mask));
            foreach (PeerConfig p in cfg.Peers)
                foreach (IpPrefix a in p.Allowed)
                {
                    if (a.IsV6) continue;
                    byte[] aa = new byte[4];
                    a.WriteAddress(aa);
                    if (a.Bits >= route.Bits && route.Contains(aa))
                        found.Add($"{a} of peer {p.Name} is inside {route} on {f[0]}: traffic may leave by {f[0]} instead of the tunnel");
                }
        }
        return found;
    }
}

/// <summary>`veil service install|uninstall [--name NAME] [--root DIR]`: the running binary as a
/// systemd template service, like wg-quick@: veil@NAME runs `veil up --config /etc/veil/NAME.toml`,
/// as root bounded to CAP_NET_ADMIN, restarted on failure (not on a config error, exit 2). --root
/// works on another file system tree (an image being built, a test), enabling offline there.
/// Configs and keys under /etc/veil are the user's: install only creates the directory (0700),
/// uninstall keeps it.</summary>
internal static class ServiceCli
{
    internal const string BinaryPath = "/usr/local/bin/veil", UnitPath = "/etc/systemd/system/veil@.service", ConfigDir = "/etc/veil";
    private const string Marker = "# written by veil service install";

    internal static string Unit() => $$"""
        {{Marker}}; `veil service uninstall` removes it.
        # veil@NAME runs {{ConfigDir}}/NAME.toml (`veil init --dir {{ConfigDir}}` writes veil.toml: veil@veil).
        # Root bounded to CAP_NET_ADMIN: the config's `user` cannot be used here (it needs CAP_SETUID).
        [Unit]
        Description=Veil mesh VPN (%i)
        Documentation=man:systemd.service(5)
        After=network-online.target nss-lookup.target
        Wants=network-online.target nss-lookup.target

        [Service]
        Type=simple
        ExecStart={{BinaryPath}} up --config {{ConfigDir}}/%i.toml
        ExecReload=/bin/kill -HUP $MAINPID
        Restart=on-failure
        RestartSec=5
        RestartPreventExitStatus=2
        CapabilityBoundingSet=CAP_NET_ADMIN
        AmbientCapabilities=CAP_NET_ADMIN
        NoNewPrivileges=yes
        ProtectSystem=full
        ReadWritePaths={{ConfigDir}}
        ProtectHome=yes
        PrivateTmp=yes
        ProtectKernelModules=yes
        ProtectKernelTunables=yes
        ProtectControlGroups=yes
        ProtectClock=yes
        ProtectKernelLogs=yes
        ProtectHostname=yes
        RestrictNamespaces=yes
        RestrictRealtime=yes
        RestrictSUIDSGID=yes
        LockPersonality=yes
        SystemCallArchitectures=native
        RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
        DevicePolicy=closed
        DeviceAllow=/dev/net/tun rw
        UMask=0077

        [Install]
        WantedBy=multi-user.target

        """;

    internal static int Run(string[] args, TextWriter o)
    {
        if (args.Length < 2 || args[1] is not ("install" or "uninstall")) throw new ConfigException("service: say install or uninstall (see 'veil help service')");
        string root = "/", name = "veil";
        for (int i = 2; i < args.Length; i++)
        {
            if (OnboardingCli.Arg(args, "--root", ref i) is string r) root = Path.GetFullPath(r);
            else if (OnboardingCli.Arg(args, "--name", ref i) is string n) name = n;
            else throw new ConfigException($"service: unknown argument '{args[i]}' (see 'veil help service')");
        }
        // The name becomes part of a unit name and a file path: no '/', '@' or spaces, and no escaping.
        if (name.Length is 0 or > 64 || name.AsSpan().IndexOfAnyExcept(InstanceChars) >= 0)
            throw new ConfigException($"service: --name '{name}' must be 1-64 letters, digits, '-', '_' or '.'");
        // systemd's own test for "booted with systemd" (sd_booted); in a chroot or image, enable offline.
        bool live = root == "/" && Directory.Exists("/run/systemd/system");
        Func<string[], (int Code, string Output)>? systemctl = FindSystemctl() is string path ? a => RunTool(path, a) : null;
        return args[1] == "install"
            ? Install(root, name, Environment.ProcessPath ?? throw new ConfigException("service: cannot tell where this binary is"), live, systemctl, o)
            : Uninstall(root, live, systemctl, o);
    }

    private static readonly System.Buffers.SearchValues<char> InstanceChars =
        System.Buffers.SearchValues.Create("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.");

    private static string In(string root, string path) => root == "/" ? path : Path.Join(root, path);

    // Refuses to touch a unit file someone else wrote; checked before anything changes.
    private static bool Ours(string unit) => !File.Exists(unit) || File.ReadAllText(unit).StartsWith(Marker, StringComparison.Ordinal);

    internal static int Install(string root, string name, string binary, bool live, Func<string[], (int, string)>? systemctl, TextWriter o)
    {
        string bin = In(root, BinaryPath), unit = In(root, UnitPath), dir = In(root, ConfigDir), cfg = Path.Join(dir, name + ".toml");
        if (!Ours(unit)) throw new ConfigException($"service: {unit} exists and was not written by veil; move it away first");
        if (!File.Exists(binary)) throw new ConfigException($"service: {binary} does not exist");
        try
        {
            if (Path.GetFullPath(binary) == Path.GetFullPath(bin)) o.WriteLine($"binary: {bin} (already there)");
            else
            {
                Directory.CreateDirectory(Path.GetDirectoryName(bin)!);
                string tmp = bin + ".tmp-" + Environment.ProcessId;
                File.Copy(binary, tmp, overwrite: true);
                File.SetUnixFileMode(tmp, (UnixFileMode)0b111_101_101);
                File.Move(tmp, bin, overwrite: true);              // a running copy keeps its old file
                o.WriteLine($"installed {bin} (from {binary})");
            }
            if (!Directory.Exists(dir))
            {
                Directory.CreateDirectory(dir);
                o.WriteLine($"created {dir} (0700) for configs and keys");
            }
            else if ((File.GetUnixFileMode(dir) & (UnixFileMode)0b000_111_111) != 0) o.WriteLine($"tightened {dir} to 0700 (it holds keys)");
            File.SetUnixFileMode(dir, (UnixFileMode)0b111_000_000);
            Directory.CreateDirectory(Path.GetDirectoryName(unit)!);
            Onboarding.WriteAtomic(unit, Unit(), (UnixFileMode)0b110_100_100);
            o.WriteLine($"wrote {unit}");
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ConfigException($"service: {e.Message}");
        }
        string instance = $"veil@{name}.service";
        if (systemctl == null) o.WriteLine($"systemctl not found: enable it by hand (a link to {UnitPath} in multi-user.target.wants)");
        else
        {
            if (live) Systemctl(systemctl, o, "daemon-reload");
            Systemctl(systemctl, o, live ? ["enable", instance] : ["--root=" + root, "enable", instance]);
        }
        if (!File.Exists(cfg))
            o.WriteLine($"next: write {ConfigDir}/{name}.toml" + (name == "veil" ? $" (veil init --dir {ConfigDir}, or veil join TOKEN --dir {ConfigDir})" : "") + $", then: systemctl start {instance}");
        else o.WriteLine($"start: systemctl start {instance}   logs: journalctl -u {instance}");
        return 0;
    }

    internal static int Uninstall(string root, bool live, Func<string[], (int, string)>? systemctl, TextWriter o)
    {
        string bin = In(root, BinaryPath), unit = In(root, UnitPath), dir = In(root, ConfigDir);
        if (!Ours(unit)) throw new ConfigException($"service: {unit} was not written by veil; leaving it alone");
        if (!File.Exists(unit))
        {
            o.WriteLine($"not installed: no {unit}");
            return 0;
        }
        // Disabling the template disables every instance; a live system also stops them.
        if (systemctl != null)
        {
            if (live) Systemctl(systemctl, o, "stop", "veil@*.service");
            Systemctl(systemctl, o, live ? ["disable", "veil@.service"] : ["--root=" + root, "disable", "veil@.service"]);
        }
        try
        {
            File.Delete(unit);
            o.WriteLine($"removed {unit}");
            if (File.Exists(bin)) { File.Delete(bin); o.WriteLine($"removed {bin}"); }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new ConfigException($"service: {e.Message}");
        }
        if (live && systemctl != null) Systemctl(systemctl, o, "daemon-reload");
        if (Directory.Exists(dir)) o.WriteLine($"kept {dir} (configs and keys are yours to remove)");
        return 0;
    }

    // Says the command, then runs it (its own lines follow on the terminal).
    private static void Systemctl(Func<string[], (int, string)> systemctl, TextWriter o, params string[] args)
    {
        o.WriteLine($"systemctl {string.Join(' ', args)}");
        o.Flush();
        var (code, output) = systemctl(args);
        string said = output.Trim().Replace('\n', ' ');
        if (code != 0) throw new ConfigException($"service: systemctl {string.Join(' ', args)} failed (exit {code})" + (said.Length > 0 ? ": " + said : ""));
    }

    private static string? FindSystemctl()
    {
        foreach (string d in (Environment.GetEnvironmentVariable("PATH") ?? "/usr/bin:/bin").Split(':'))
            if (d.Length > 0 && File.Exists(Path.Join(d, "systemctl"))) return Path.Join(d, "systemctl");
        return null;
    }

    private const int SystemctlTimeoutMs = 120_000;

    // Its output (stderr with it) is kept for the error message.
    private static (int, string) RunTool(string path, string[] args)
    {
        try
        {
            Spawn.Exit p = Spawn.Run([path, .. args], ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
                                     null, withStderr: true, 64 * 1024, SystemctlTimeoutMs);
            return (p.TimedOut ? 124 : p.Code, p.TimedOut ? $"timed out after {SystemctlTimeoutMs / 1000} s" : p.Output);
        }
        catch (IOException e) { throw new ConfigException($"service: {e.Message}"); }
    }
}

/// <summary>The node's side of a join (§19): a JoinHello in, a joiner queued for the daemon, the answer out.</summary>
internal sealed partial class Node
{
    internal Invites? Invites;                   // set by the daemon when it can persist joiners

    private void ReceiveJoin(ReadOnlySpan<byte> d, in Endpoint from)
    {
        byte[]? reply = Invites?.Consume(d, Log, from);
        if (reply == null) { Counters.Drop(DropReason.Malformed); return; }
        if (Invites!.Joiners.Count > 0) Signal.Poke();            // the loop has a joiner to write down
        SendDatagram(from, reply);
    }

    /// <summary>Queues a datagram the node made whole (a JoinAccept); nothing when it is empty.</summary>
    internal void SendDatagram(in Endpoint to, ReadOnlySpan<byte> datagram)
    {
        if (datagram.Length == 0) return;
        datagram.CopyTo(NextOut(to));
        CommitOut(datagram.Length);
    }
}

/// <summary>The daemon's side of a join: the joiner written to the config file (synced, on the chores
/// thread), `veil invite` answered, and the free address an invite hands out.</summary>
internal sealed unsafe partial class Daemon
{
    // On the chores thread: a joiner with a valid invite is appended to the config file (synced),
    // then applied by a reload; the loop then answers it, or frees the invite if that failed.
    private void WriteJoiner(Invites.Joiner j)
    {
        PreparedReload? reload = null;
        string error, path = _cfg.ConfigPath!;
        if (_cfg.Peers.Exists(q => q.Name == j.Peer.Name)) j.Peer.Name = "";   // taken: the key's default name
        string? secretPath = j.Peer.PskFile.Length > 0 ? Path.Combine(Path.GetDirectoryName(Path.GetFullPath(path))!, j.Peer.PskFile) : null;
        bool secretWritten = false;
        try
        {
            string old = File.ReadAllText(path);
            // A key already in the config is refused before anything is written: its [[peer]] (and
            // a guest's secret file) stay as they are.
            if (_cfg.Peers.Exists(q => q.PublicKey.EqualsCt(j.Peer.PublicKey))) throw new ConfigException("this key is a peer already");
            if (secretPath != null)
            {
                using (var fs = new FileStream(secretPath, FileMode.CreateNew, FileAccess.Write, FileShare.None))
                {
                    File.SetUnixFileMode(secretPath, UnixFileMode.UserRead | UnixFileMode.UserWrite);
                    secretWritten = true;
                    fs.Write(Encoding.ASCII.GetBytes(j.Peer.Psk.ToBase64() + "\n"));
                    fs.Flush(flushToDisk: true);
                }
            }
            Onboarding.AppendPeer(path, j.Peer);
            reload = PrepareReload("join");
            error = reload.Code == ReloadCode.Ok ? "" : reload.Message;
            if (error.Length > 0)                                               // the file goes back as it was
            {
                if (secretWritten) File.Delete(secretPath!);
                Onboarding.WriteAtomic(path, old, File.GetUnixFileMode(path));
                _configStamp = ConfigStamp();
                reload = null;
            }
        }
        catch (Exception e) when (e is ConfigException or IOException or UnauthorizedAccessException)
        {
            error = e.Message;
            if (secretWritten && reload == null) try { File.Delete(secretPath!); } catch (IOException) { }
        }
        j.Peer.Psk.Clear();                                       // the node holds its own copy now
        _chores!.Return(() =>
        {
            if (reload != null) CommitReload(reload);
            // An accepted joiner stays through a rollback of a confirm window: it was answered.
            if (reload != null && _rollbackAtMs != 0 && _confirmedText != null)
                _confirmedText += (_confirmedText.EndsWith('\n') ? "" : "\n") + Onboarding.PeerToml(j.Peer);
            Node node = _node!;
            lock (node.Gate)
            {
                if (node.Invites!.Written(j, error, _log) is byte[] accept) node.SendDatagram(j.From, accept);
                _worker!.FlushUdp(node.UdpOut);
            }
            SaveInvites();
        });
    }

    internal Invites? Invites => _node?.Invites;

    // Beside the config file, named after it (veil@NAME's /etc/veil/NAME.toml keeps NAME.invites).
    private string? InvitesPath => _cfg.ConfigPath != null ? Path.ChangeExtension(Path.GetFullPath(_cfg.ConfigPath), _cfg.NetworkName != null ? "." + _cfg.NetworkName + ".invites" : ".invites") : null;
    private string _invitesWritten = "";

    private void LoadInvites(Invites invites)
    {
        string path = InvitesPath!;
        long nowUnix = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        if (File.Exists(path))
        {
            string? error;
            int restored = 0;
            try { error = invites.Load(File.ReadAllText(path), nowUnix, out restored); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { error = e.Message; }
            if (error != null) _log.Warn("invites_ignored", $"file={path} error=\"{error}\" hint=\"its tokens no longer work; issue new ones\"");
            else _log.Info("invites_loaded", $"file={path} pending={restored}");
        }
        _invitesWritten = invites.Snapshot(nowUnix);
        if (!File.Exists(path)) _invitesWritten = Invites.FileHeader;   // no file and nothing pending: none written
    }

    /// <summary>After an invite is made, revoked or used: the file follows, written by the chores
    /// thread (now: here, at shutdown).</summary>
    internal void SaveInvites(bool now = false)
    {
        if (InvitesPath is not string path) return;
        string text;
        lock (_node!.Gate) text = _node.Invites!.Snapshot(DateTimeOffset.UtcNow.ToUnixTimeSeconds());
        if (text == _invitesWritten) return;
        _invitesWritten = text;
        if (now) WriteAtomically(path, text, _log, "invites_not_saved");
        else _chores!.Post(() => WriteAtomically(path, text, _log, "invites_not_saved"));
    }

    /// <summary>Answers `veil invite`: "invite SECONDS NAME|- ENDPOINT|- NETWORK [isolated]".</summary>
    internal string Invite(string request)
    {
        string[] f = request.Split(' ');
        Node node = _node!;
        if (f.Length is not (5 or 6) || f.Length == 6 && f[5] != "isolated" || !long.TryParse(f[1], out long seconds) || seconds <= 0) return "error: malformed invite request\n";
        if (node.Invites == null) return "error: this daemon runs without --config, so it cannot write a joiner down; start it with --config FILE\n";
        string endpoint = f[3];
        // Without --endpoint: the listen address if it is one address, else the best guess at how
        // joiners reach us: the gateway's port mapping, where members see us, then our own addresses
        // (IPv4 first).
        if (endpoint == "-")
        {
            if (!_cfg.ListenAddress.Equals(IPAddress.Any) && !_cfg.ListenAddress.Equals(IPAddress.IPv6Any))
                endpoint = new Endpoint { Address = Endpoint.FromIp(_cfg.ListenAddress, 0).Address, Port = (ushort)_cfg.ListenPort }.ToString();
            else if (GuessEndpoint(node.Mesh) is Endpoint guess) endpoint = guess.ToString();
            else return "error: give --endpoint HOST:PORT: how joiners reach this node (no address of it is known)\n";
        }
        IfAddress own = _cfg.Addresses.Find(a => !a.IsV6);
        if (own.Address == null) return "error: invites hand out IPv4 overlay addresses; this node has none\n";
        IfAddress? free = FreeAddress(node, own);
        if (free == null) return $"error: no free address left in {new IpPrefix(own.Address.GetAddressBytes(), own.Bits)}\n";
        try
        {
            // The joiner names us as we name ourselves: --name, else the host's name.
            InviteToken t = node.Invites.Create(node.Handshaker.PublicKey, endpoint, f[4], own, free.Value, f[2] == "-" ? "" : f[2],
                DateTimeOffset.UtcNow.ToUnixTimeSeconds() + seconds, _cfg.Name.Length > 0 ? _cfg.Name : UpConfig.MendName(Environment.MachineName), isolated: f.Length == 6);
            _log.Info("invite_created", $"invite={t.Id:x16} address={t.JoinerAddress} expires_in_s={seconds}{(f.Length == 6 ? " isolated=true" : "")}");
            return "ok: " + t.Encode() + "\n";
        }
        catch (ConfigException e) { return "error: " + e.Message + "\n"; }
    }

    internal static Endpoint? GuessEndpoint(Mesh m)
    {
        if (m.Mapped.IsSet) return m.Mapped;
        if (m.Observed.Count > 0) return m.Observed[^1];             // the newest
        foreach (Endpoint e in m.LocalEndpoints) if (e.IsV4) return e;
        return m.LocalEndpoints.Count > 0 ? m.LocalEndpoints[0] : null;
    }

    // The lowest host address of our IPv4 network that no peer, invite or this node uses.
    private static IfAddress? FreeAddress(Node node, IfAddress own)
    {
        var used = new HashSet<uint> { BinaryPrimitives.ReadUInt32BigEndian(own.Address.GetAddressBytes()) };
        foreach (Peer p in node.Peers)
            if (p.Active)
            {
                var taken = new List<IpPrefix>(p.Allowed);
                foreach (Claim c in p.Claims) taken.Add(c.Prefix);
                foreach (IpPrefix a in taken)
                    if (!a.IsV6) { byte[] b = new byte[4]; a.WriteAddress(b); used.Add(BinaryPrimitives.ReadUInt32BigEndian(b)); }
            }
        foreach (IPAddress r in node.Invites!.ReservedAddresses()) used.Add(BinaryPrimitives.ReadUInt32BigEndian(r.GetAddressBytes()));
        uint mask = own.Bits == 0 ? 0 : uint.MaxValue << (32 - own.Bits);
        uint net = BinaryPrimitives.ReadUInt32BigEndian(own.Address.GetAddressBytes()) & mask;
        uint hosts = ~mask;
        // h = 0 is the network's own address and h = hosts its broadcast address: neither is handed out.
        // The scan stops after 65535 hosts, so a /8 costs no long loop under the node's lock.
        for (uint h = 1; h < hosts && h < 65536; h++)
            if (!used.Contains(net | h))
            {
                byte[] b = new byte[4];
                BinaryPrimitives.WriteUInt32BigEndian(b, net | h);
                return new IfAddress(new IPAddress(b), own.Bits);
            }
        return null;
    }
}
