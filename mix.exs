defmodule FineTuning.MixProject do
  # The bridge lives in elixir_bridge/, but mix.exs sits at the repo root so that `mix test`
  # from a fresh clone finds the Python worker at .venv/bin/finetune-worker next to it.
  use Mix.Project

  def project do
    [
      app: :fine_tuning,
      version: "0.1.0",
      elixir: "~> 1.14",
      elixirc_paths: elixirc_paths(Mix.env()),
      test_paths: ["elixir_bridge/test"],
      test_pattern: "*_test.exs",
      start_permanent: Mix.env() == :prod,
      # No hex packages: hex.pm may be unreachable where this runs.
      deps: [],
      docs: [main: "FineTuning"]
    ]
  end

  def application do
    [extra_applications: [:logger]]
  end

  defp elixirc_paths(:test), do: ["elixir_bridge/lib", "elixir_bridge/test/support"]
  defp elixirc_paths(_), do: ["elixir_bridge/lib"]
end
