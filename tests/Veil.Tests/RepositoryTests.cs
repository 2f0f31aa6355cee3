using System.Text.RegularExpressions;

namespace Veil.Tests;

// What a clone of the repository must hold for its tests to mean anything: the vector files it
// carries are the published ones, and product and tests build for one target framework.
public class RepositoryTests
{
    [Fact]
    public void VectorFiles_EachListedInReadme_MatchesItsSha256()
    {
        string readme = File.ReadAllText(Path.Combine(Vectors.Dir, "README.md"));
        var listed = new Dictionary<string, string>();
        foreach (string line in readme.Split('\n'))
        {
            string[] f = line.Trim().Split("  ");
            if (f.Length == 2 && f[0].Length == 64 && f[1].EndsWith(".json")) listed[f[1]] = f[0];
        }
        string[] files = Directory.GetFiles(Vectors.Dir, "*.json");
        Assert.Equal(7, files.Length);
        foreach (string path in files)
        {
            string name = Path.GetFileName(path);
            Assert.True(listed.ContainsKey(name), $"{name} has no SHA-256 line in tests/vectors/README.md");
            string sha = Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(File.ReadAllBytes(path)));
            Assert.Equal(listed[name], sha);
        }
    }

    [Fact]
    public void TargetFramework_ProductAndTests_AreTheSame()
    {
        string root = Path.GetFullPath(Path.Combine(Vectors.Dir, "..", ".."));
        string product = File.ReadAllText(Path.Combine(root, "Veil.csproj"));
        string tests = File.ReadAllText(Path.Combine(root, "tests", "Veil.Tests", "Veil.Tests.csproj"));
        string tfm = Regex.Match(product, "<VeilTargetFramework>([^<]+)</VeilTargetFramework>").Groups[1].Value;
        Assert.Equal("net10.0", tfm);
        Assert.Equal(tfm, Regex.Match(tests, "<TargetFramework>([^<]+)</TargetFramework>").Groups[1].Value);
        Assert.Equal(tfm, typeof(RepositoryTests).Assembly.GetCustomAttributes(false)
            .OfType<System.Runtime.Versioning.TargetFrameworkAttribute>().Single().FrameworkName switch
            { ".NETCoreApp,Version=v10.0" => "net10.0", var other => other });
    }
}
