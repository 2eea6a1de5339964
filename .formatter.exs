[
  inputs: [
    "mix.exs",
    ".formatter.exs",
    "elixir_bridge/{lib,test}/**/*.{ex,exs}"
  ]
]
