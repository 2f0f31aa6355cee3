using System.Text.Json;

namespace Veil.Tests;

/// <summary>§6 AdminSignature and §15 revocations and secret rotation.</summary>
public sealed class RevocationTests
{
    private static readonly byte[] s_admin = AdminSignature.NewPrivateKey();
    private static readonly byte[] s_adminPub = AdminSignature.PublicKeyOf(s_admin)!;

    private static byte[] Fixed32(string hex)
    {
        byte[] b = Vectors.Hex(hex);
        if (b.Length > 32) b = b[^32..];                              // a leading 00 keeps the number positive
        return [.. new byte[32 - b.Length], .. b];
    }

    [Fact]
    public void Verify_WycheproofP1363_EveryCaseAsExpected()
    {
        using JsonDocument doc = Vectors.Load("ecdsa_secp256r1_sha256_p1363_test.json");
        int cases = 0, valid = 0;
        var wrong = new List<int>();
        foreach (JsonElement g in doc.RootElement.GetProperty("testGroups").EnumerateArray())
        {
            JsonElement key = g.GetProperty("publicKey");
            byte[] pub = [.. Fixed32(Vectors.Str(key, "wx")), .. Fixed32(Vectors.Str(key, "wy"))];
            foreach (JsonElement t in g.GetProperty("tests").EnumerateArray())
            {
                bool expect = Vectors.Str(t, "result") == "valid";
                bool got = AdminSignature.Verify(pub, Vectors.Hex(Vectors.Str(t, "msg")), Vectors.Hex(Vectors.Str(t, "sig")));
                if (got != expect) wrong.Add(t.GetProperty("tcId").GetInt32());
                cases++;
                if (expect) valid++;
            }
        }
        Assert.Equal(262, cases);
        Assert.Equal(173, valid);
        Assert.Empty(wrong);
    }

    [Fact]
    public void AdminKey_SignVerify_AndOffCurvePointsRefused()
    {
        Assert.Equal(AdminSignature.PublicKeyLen, s_adminPub.Length);
        Assert.True(AdminSignature.IsPublicKey(s_adminPub));
        byte[] msg = "hello"u8.ToArray();
        byte[] sig = AdminSignature.Sign(s_admin, msg);
        Assert.True(AdminSignature.Verify(s_adminPub, msg, sig));
        Assert.False(AdminSignature.Verify(s_adminPub, "hellO"u8, sig));
        byte[] offCurve = (byte[])s_adminPub.Clone();
        offCurve[63] ^= 1;
        Assert.False(AdminSignature.IsPublicKey(offCurve));
        Assert.False(AdminSignature.Verify(offCurve, msg, sig));
        Assert.False(AdminSignature.Verify(s_adminPub, msg, sig.AsSpan(0, 63)));
        Assert.Null(AdminSignature.PublicKeyOf([1, 2, 3]));
    }

    [Fact]
    public void Revocation_EncodeDecode_AndEveryByteIsSigned()
    {
        Key32 member = TestNode.KeyFromSeed(7);
        Revocation r = Revocation.Create(s_admin, member, 1_800_000_000);
        string line = r.Encode();
        Revocation back = Revocation.Decode(line)!;
        Assert.True(back.Key.EqualsCt(member));
        Assert.Equal(1_800_000_000, back.IssuedUnixS);
        Assert.True(back.Verify(s_adminPub));
        Assert.False(back.Verify(AdminSignature.PublicKeyOf(AdminSignature.NewPrivateKey())!));   // another network's admin
        byte[] raw = Convert.FromBase64String(line);
        for (int i = 0; i < raw.Length; i++)
        {
            byte[] bad = (byte[])raw.Clone();
            bad[i] ^= 0x40;
            Assert.False(Revocation.Read(bad)!.Verify(s_adminPub), $"byte {i} is not covered by the signature");
        }
        Assert.Null(Revocation.Decode(line[..^4]));
        Assert.Null(Revocation.Decode("not base64!"));
    }

    [Fact]
    public void Exchange_RevokedMessage_CountAndLengthChecked()
    {
        var m = new ExchangeMessage();
        byte[] one = Convert.FromBase64String(Revocation.Create(s_admin, TestNode.KeyFromSeed(7), 1).Encode());
        byte[] msg = [ExchangeMessage.TypeRevoked, 1, .. one];
        Assert.True(m.Parse(msg));
        Assert.Single(m.Revocations);
        Assert.False(m.Parse([ExchangeMessage.TypeRevoked, 0]));                          // none
        Assert.False(m.Parse([ExchangeMessage.TypeRevoked, 2, .. one]));                  // fewer than it says
        Assert.False(m.Parse([.. msg, 0]));                                               // a byte too many
        Assert.False(m.Parse([ExchangeMessage.TypeRevoked, (byte)(ExchangeMessage.MaxRevocations + 1)]));
        Assert.Equal(11, ExchangeMessage.MaxRevocations);                                 // (1200 - 2) / 104
    }

    // What the daemon does with revocations members pass on: check each signature, apply the good.
    private static void CheckUnverified(TestNode n, long nowMs)
    {
        foreach (Revocation r in n.Node.Mesh.TakeUnverified())
            if (r.Verify(n.Node.Mesh.AdminKey!)) n.Node.Mesh.Revoke(r, nowMs);
    }

    [Fact]
    public void Revoke_DropsTheMember_PassesItOn_AndRefusesItsHandshakes()
    {
        // A full mesh of three; every node names the admin key. A revokes C.
        var t = TestNet.Mesh(3, i => i == 0 ? [] : [0], (i, c) => c.AdminKey = s_adminPub);
        t.Start();
        TestNode a = t.Nodes[0], b = t.Nodes[1], c = t.Nodes[2];
        Assert.True(t.AdvanceUntil(() => b.Node.FindPeer(c.Public)?.Up == true && a.Node.FindPeer(c.Public)?.Up == true, 30_000) >= 0);

        Assert.True(a.Node.Mesh.Revoke(Revocation.Create(s_admin, c.Public, 1_800_000_000), t.NowMs));
        Assert.Null(a.Node.FindPeer(c.Public));                                           // dropped at once, sessions with it
        Assert.DoesNotContain(a.Node.RouteList, r => r.Prefix.ToString() == "100.64.0.3/32");
        Assert.False(a.Node.Mesh.Revoke(Revocation.Create(s_admin, c.Public, 1_800_000_001), t.NowMs));   // known already

        // B hears it in A's next exchange; once checked, it drops C too
        Assert.True(t.AdvanceUntil(() => b.Node.Mesh.Unverified.Count > 0, 10_000) >= 0);
        Assert.NotNull(b.Node.FindPeer(c.Public));                                        // nothing applied before the check
        CheckUnverified(b, t.NowMs);
        Assert.Null(b.Node.FindPeer(c.Public));
        Assert.Equal(1, b.Node.Mesh.RevocationCount);

        // C keeps trying: both refuse its handshakes, and nobody learns it back from a member list
        long refusedBefore = a.Node.Mesh.RevokedRefused + b.Node.Mesh.RevokedRefused;
        t.Advance(60_000, 1_000);
        CheckUnverified(a, t.NowMs);
        CheckUnverified(b, t.NowMs);
        Assert.Null(a.Node.FindPeer(c.Public));
        Assert.Null(b.Node.FindPeer(c.Public));
        Assert.True(a.Node.Mesh.RevokedRefused + b.Node.Mesh.RevokedRefused > refusedBefore);
        Assert.Equal(0, t.Send(2, 0));
        Assert.Equal(1, t.Send(0, 1));                                                     // A and B are unharmed
    }

    [Fact]
    public void Revocations_ForgedOrWithoutAdminKey_ChangeNothing()
    {
        byte[] otherAdmin = AdminSignature.NewPrivateKey();
        var t = TestNet.Mesh(3, i => i == 0 ? [] : [0], (i, c) => { if (i != 2) c.AdminKey = s_adminPub; });
        t.Start();
        TestNode a = t.Nodes[0], b = t.Nodes[1], c = t.Nodes[2];
        Assert.True(t.AdvanceUntil(() => b.Node.FindPeer(c.Public)?.Up == true && c.Node.FindPeer(b.Public)?.Up == true, 30_000) >= 0);
        // A member passes on a revocation of B signed by some other key: checked, refused, B stays.
        a.Node.Mesh.Revoke(Revocation.Create(otherAdmin, b.Public, 1), t.NowMs);          // A applies it blindly (as a buggy node would)
        Assert.True(t.AdvanceUntil(() => c.Node.Mesh.ReceivedMessages > 0 && b.Node.Mesh.RevocationCount == 0, 10_000) >= 0);
        t.Advance(5_000);
        Assert.Empty(c.Node.Mesh.Unverified);                                              // C names no admin key: ignored
        Assert.NotNull(c.Node.FindPeer(b.Public));
        foreach (Revocation r in b.Node.Mesh.TakeUnverified()) Assert.False(r.Verify(s_adminPub));
        Assert.True(b.Node.FindPeer(c.Public)?.Up);
    }

    [Fact]
    public void SecretRotation_NodeByNode_NoPairEverLosesItsHandshake()
    {
        // Three members on secret A. Step 1: each accepts B too. Step 2: each moves to B, still
        // accepting A. Step 3: A is dropped. After every single node's change, every pair handshakes.
        Key32 secretA = TestNet.MeshPsk(0xA5), secretB = TestNet.MeshPsk(0xB6);
        var t = TestNet.Mesh(3, i => i == 0 ? [] : [0]);
        t.Start();
        Assert.True(t.AdvanceUntil(() => t.Nodes.TrueForAll(n => n.Node.Peers.FindAll(p => p.Active && p.Up).Count == 2), 30_000) >= 0);

        void Rotate(int i, Key32 psk, Key32[] accept)
        {
            TestNode n = t.Nodes[i];
            UpConfig cfg = TestNet.MeshConfig(i, t.Keys, i == 0 ? [] : [0]);
            cfg.Psk = psk;
            cfg.AcceptPsks = accept;
            cfg.SecretsRead = true;
            n.Node.Apply(cfg, t.NowMs);
            // fresh handshakes everywhere: each pair must agree on some secret now
            foreach (TestNode m in t.Nodes) foreach (Peer p in m.Node.Peers) if (p.Active) { m.Node.DropSessions(p); m.Node.StartHandshake(p, t.NowMs, retransmit: false); m.Worker.FlushUdp(m.Node.UdpOut); }
            Assert.True(t.AdvanceUntil(() => t.Nodes.TrueForAll(x => x.Node.Peers.FindAll(p => p.Active && p.HasReadySession(t.NowMs, Spec.RejectAfterTimeMs)).Count == 2), 30_000) >= 0,
                $"after node {i}'s step a pair could not handshake");
        }
        for (int i = 0; i < 3; i++) Rotate(i, secretA, [secretB]);
        for (int i = 0; i < 3; i++) Rotate(i, secretB, [secretA]);
        for (int i = 0; i < 3; i++) Rotate(i, secretB, []);
        for (int i = 0; i < 3; i++) for (int j = 0; j < 3; j++) if (i != j) Assert.Equal(1, t.Send(i, j));

        // a node left on the old secret alone cannot get in
        UpConfig old = TestNet.MeshConfig(2, t.Keys, [0]);
        old.Psk = secretA;
        old.SecretsRead = true;
        t.Nodes[2].Node.Apply(old, t.NowMs);
        foreach (Peer p in t.Nodes[2].Node.Peers) if (p.Active) { t.Nodes[2].Node.DropSessions(p); t.Nodes[2].Node.StartHandshake(p, t.NowMs, retransmit: false); }
        t.Nodes[2].Worker.FlushUdp(t.Nodes[2].Node.UdpOut);
        t.Advance(10_000);
        Assert.False(t.Nodes[2].Node.FindPeer(t.Nodes[0].Public)!.HasReadySession(t.NowMs, Spec.RejectAfterTimeMs));
    }
}
