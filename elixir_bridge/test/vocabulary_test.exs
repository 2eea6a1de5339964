defmodule FineTuning.VocabularyTest do
  # The atoms the worker may send come from python/finetune_worker/{events,errors}.py; the
  # bridge declares them from docs/finetune_worker_atoms.eterm and names some groups of them in
  # FineTuning.Protocol. A frame carrying an atom the bridge lacks would be refused by
  # binary_to_term(_, [:safe]), so all of them must stay equal.
  use ExUnit.Case, async: true

  alias FineTuning.Protocol
  import FineTuning.TestHelpers

  # One "section name" pair per line: OTP 25 has no JSON decoder.
  @script """
  from finetune_worker import errors
  from finetune_worker.wire import vocabulary as events
  sections = {
      "event_types": events.EVENT_TYPES,
      "terminal_types": events.TERMINAL_TYPES,
      "phases": events.PHASES,
      "log_levels": events.LOG_LEVELS,
      "error_codes": errors.ERROR_CODES,
      "atoms": events.atom_vocabulary(),
      "atom_value_keys": set(events.ATOM_VALUES),
  }
  for section, names in sections.items():
      for name in sorted(names):
          print(section, name)
  """

  setup_all do
    {out, 0} = System.cmd(python(), ["-c", @script], cd: repo())

    sections =
      out
      |> String.split("\n", trim: true)
      |> Enum.map(&String.split(&1, " ", parts: 2))
      |> Enum.group_by(&hd/1, fn [_, name] -> name end)
      |> Map.new(fn {section, names} -> {section, MapSet.new(names)} end)

    %{python: sections}
  end

  defp names(atoms), do: MapSet.new(atoms, &Atom.to_string/1)

  for {section, fun} <- [
        event_types: :event_types,
        terminal_types: :terminal_types,
        phases: :phases,
        log_levels: :log_levels,
        error_codes: :error_codes,
        atoms: :atoms
      ] do
    test "#{section} match the Python worker", %{python: python} do
      ours = names(apply(Protocol, unquote(fun), []))
      theirs = Map.fetch!(python, unquote(Atom.to_string(section)))
      assert MapSet.difference(theirs, ours) == MapSet.new(), "missing in FineTuning.Protocol"
      assert MapSet.difference(ours, theirs) == MapSet.new(), "not in the Python worker"
    end
  end

  test "the keys whose values are atoms are declared", %{python: python} do
    assert MapSet.subset?(python["atom_value_keys"], names(Protocol.atoms()))
  end

  test "every atom literal in the worker's sources is declared" do
    names = MapSet.new(Protocol.atoms(), &Atom.to_string/1)

    literals =
      for file <- Path.wildcard(Path.join(repo(), "python/finetune_worker/**/*.py")),
          [_, name] <- Regex.scan(~r/\bAtom\(["']([^"']+)["']\)/, File.read!(file)),
          not String.contains?(file, [
            "/testing/",
            "/wire/terms.py",
            "/wire/decode.py",
            "/wire/encode.py"
          ]),
          do: {Path.relative_to(file, repo()), name}

    assert literals != []
    assert Enum.reject(literals, fn {_, name} -> name in names end) == []
  end

  test "error classes are the worker's exception classes" do
    {out, 0} =
      System.cmd(
        python(),
        [
          "-c",
          "import finetune_worker.errors as e\n" <>
            "for n in ('ProtocolError', 'CallError', 'ConfigError'):\n" <>
            "    print(getattr(e, n).__module__ + '.' + n)"
        ],
        cd: repo()
      )

    for class <- String.split(out, "\n", trim: true) do
      assert String.to_atom(class) in Protocol.error_classes()
    end
  end
end
