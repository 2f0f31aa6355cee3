using System.Text.Json;

// Veil.cs is Linux-only ([assembly: SupportedOSPlatform("linux")]); so are its tests (CA1416).
[assembly: System.Runtime.Versioning.SupportedOSPlatform("linux")]

namespace Veil.Tests;

// Locates and loads the third-party vectors in tests/vectors (see its README.md for sources and
// licences). Order: $VEIL_VECTORS, else walk up from the test binary to the folder holding
// Veil.csproj and use tests/vectors in it: the repository carries its own copies.
internal static class Vectors
{
    private static readonly Lazy<string> s_dir = new(Locate);

    internal static string Dir => s_dir.Value;

    internal static JsonDocument Load(string fileName) =>
        JsonDocument.Parse(File.ReadAllBytes(Path.Combine(Dir, fileName)));

    internal static byte[] Hex(string hex) => Convert.FromHexString(hex);

    // Hex field of a JSON object; "" is the empty byte string.
    internal static byte[] Hex(JsonElement obj, string name) => Convert.FromHexString(Str(obj, name));

    internal static string Str(JsonElement obj, string name) =>
        obj.GetProperty(name).GetString() ?? throw new InvalidDataException($"field '{name}' is null");

    // Wycheproof "flags" as one comma-separated string (stable, readable in a test name).
    internal static string Flags(JsonElement test)
    {
        if (!test.TryGetProperty("flags", out JsonElement flags)) return "";
        var names = new List<string>();
        foreach (JsonElement f in flags.EnumerateArray()) names.Add(f.GetString() ?? "");
        return string.Join(",", names);
    }

    private static string Locate()
    {
        string? env = Environment.GetEnvironmentVariable("VEIL_VECTORS");
        if (!string.IsNullOrEmpty(env))
        {
            if (!Directory.Exists(env)) throw new DirectoryNotFoundException($"VEIL_VECTORS={env} does not exist");
            return env;
        }
        for (DirectoryInfo? d = new(AppContext.BaseDirectory); d != null; d = d.Parent)
        {
            if (!File.Exists(Path.Combine(d.FullName, "Veil.csproj"))) continue;
            string dir = Path.GetFullPath(Path.Combine(d.FullName, "tests", "vectors"));
            if (!Directory.Exists(dir)) throw new DirectoryNotFoundException($"vectors not found at {dir} (set VEIL_VECTORS)");
            return dir;
        }
        throw new DirectoryNotFoundException(
            $"no Veil.csproj above {AppContext.BaseDirectory}; set VEIL_VECTORS to the tests/vectors folder");
    }
}

