defmodule FineTuning.ProtocolTest do
  use ExUnit.Case, async: true

  alias FineTuning.Protocol

  doctest FineTuning.Protocol

  describe "encode" do
    test "a call is {'C', Id, finetune_worker, Function, Args} in ETF" do
      bin = Protocol.encode_call(3, :submit, [%{"a" => 1}, self()])
      assert <<131, _::binary>> = bin

      assert :erlang.binary_to_term(bin) ==
               {:C, 3, :finetune_worker, :submit, [%{"a" => 1}, self()]}
    end

    test "a cast is {'M', Message}" do
      assert :erlang.binary_to_term(Protocol.encode_cast({:cancel, "job-1"})) ==
               {:M, {:cancel, "job-1"}}
    end

    test "floats go out as NEW_FLOAT_EXT, as ErlPort sends them" do
      # {'M', 1.5}: SMALL_TUPLE_EXT, 2, ATOM_EXT "M", NEW_FLOAT_EXT (70) with 8 bytes.
      assert <<131, 104, 2, 100, 0, 1, ?M, 70, 1.5::float-64>> = Protocol.encode_cast(1.5)
    end

    test "bad arguments are refused" do
      assert_raise FunctionClauseError, fn -> Protocol.encode_call(-1, :info, []) end
      assert_raise FunctionClauseError, fn -> Protocol.encode_call(1, "info", []) end
    end
  end

  describe "decode" do
    test "replies, error replies, messages and prints" do
      pid = self()

      assert Protocol.decode(:erlang.term_to_binary({:r, 1, :ok})) == {:ok, {:reply, 1, :ok}}

      assert Protocol.decode(
               :erlang.term_to_binary(
                 {:e, 2, {:python, :"finetune_worker.errors.CallError", "no such function", []}}
               )
             ) ==
               {:ok,
                {:error_reply, 2, {:"finetune_worker.errors.CallError", "no such function", []}}}

      event = {:fine_tuning, "job-1", :progress, %{step: 3, total_steps: 10, percent: 30.0}}

      assert Protocol.decode(:erlang.term_to_binary({:M, pid, event})) ==
               {:ok, {:message, pid, event}}

      assert Protocol.decode(:erlang.term_to_binary({:P, "hi\n"})) == {:ok, {:print, "hi\n"}}
    end

    test "every declared atom survives a [:safe] decode" do
      bin = :erlang.term_to_binary({:r, 1, Protocol.atoms()})
      assert {:ok, {:reply, 1, atoms}} = Protocol.decode(bin)
      assert atoms == Protocol.atoms()
    end

    test "garbage is an error, not a crash" do
      assert {:error, {:undecodable, _}} = Protocol.decode(<<1, 2, 3>>)
      assert {:error, {:undecodable, _}} = Protocol.decode(<<>>)
      assert {:error, {:undecodable, _}} = Protocol.decode(<<131, 104, 2, 97>>)
      assert {:error, {:undecodable, msg}} = Protocol.decode(:binary.copy(<<0>>, 100))
      assert msg =~ "100 bytes"
    end

    test "an atom nobody declared is refused ([:safe] mints no atoms)" do
      name = "protocol_test_never_an_atom_#{System.unique_integer([:positive])}"
      # ATOM_UTF8_EXT (118) built by hand, so this test itself never creates the atom.
      frame = <<131, 104, 3, 100, 0, 1, ?r, 97, 1, 118, byte_size(name)::16, name::binary>>
      assert {:error, {:undecodable, _}} = Protocol.decode(frame)
      assert_raise ArgumentError, fn -> String.to_existing_atom(name) end
    end

    test "reply_id reads the call id of a reply it cannot decode" do
      assert Protocol.reply_id(:erlang.term_to_binary({:r, 7, :x})) == {:ok, 7}
      assert Protocol.reply_id(:erlang.term_to_binary({:e, 70_000, :x})) == {:ok, 70_000}
      utf8 = :erlang.term_to_binary({:r, 300, :x}, [:deterministic, {:minor_version, 2}])
      assert Protocol.reply_id(utf8) == {:ok, 300}
      assert Protocol.reply_id(:erlang.term_to_binary({:M, 7, :x})) == :error
      assert Protocol.reply_id(:erlang.term_to_binary({:r, -1, :x})) == :error
      assert Protocol.reply_id(<<131, 104, 3, 100, 0, 1, ?r>>) == :error
      assert Protocol.reply_id(<<1, 2, 3>>) == :error
    end

    test "well-formed terms that are not messages are reported" do
      assert Protocol.decode(:erlang.term_to_binary({:r, :not_an_id, 1})) ==
               {:error, {:unexpected, {:r, :not_an_id, 1}}}

      assert Protocol.decode(:erlang.term_to_binary([1, 2])) == {:error, {:unexpected, [1, 2]}}
    end

    test "compressed terms decode too" do
      result = String.duplicate("x", 10_000)
      bin = :erlang.term_to_binary({:r, 9, result}, compressed: 6)
      assert <<131, 80, _::binary>> = bin
      assert Protocol.decode(bin) == {:ok, {:reply, 9, result}}
    end
  end

  describe "config_term" do
    test "JSON binaries pass through unchanged" do
      json = ~s({"job": "train"})
      assert Protocol.config_term(json) == {:ok, json}
    end

    test "maps become string-keyed, with atom values as strings" do
      config = %{job: :train, peft: %{method: :lora, r: 8}, data: %{"packing" => true}, x: nil}

      assert Protocol.config_term(config) ==
               {:ok,
                %{
                  "job" => "train",
                  "peft" => %{"method" => "lora", "r" => 8},
                  "data" => %{"packing" => true},
                  "x" => nil
                }}

      assert Protocol.config_term(%{"prompts" => ["a", [%{role: :user}]]}) ==
               {:ok, %{"prompts" => ["a", [%{"role" => "user"}]]}}
    end

    test "{:file, path} is expanded against this node's working directory" do
      assert Protocol.config_term({:file, "configs/x.json"}) ==
               {:ok, {:file, Path.expand("configs/x.json")}}

      assert Protocol.config_term({:file, ~c"/abs/x.json"}) == {:ok, {:file, "/abs/x.json"}}
    end

    test "what cannot be sent is reported with its path" do
      assert {:error, [%{path: "peft.target_modules[1]", message: msg}]} =
               Protocol.config_term(%{peft: %{target_modules: ["q", {:k}]}})

      assert msg =~ "only maps"

      assert {:error, [%{path: "a", message: "structs cannot be sent in a config"}]} =
               Protocol.config_term(%{a: ~D[2024-01-01]})

      assert {:error, [%{path: "", message: "config keys must be strings or atoms"}]} =
               Protocol.config_term(%{1 => 2})

      assert {:error, [%{path: "", message: msg}]} = Protocol.config_term([1, 2])
      assert msg =~ "a config must be a map"
    end
  end

  test "terminal types" do
    assert Protocol.terminal?(:completed)
    assert Protocol.terminal?(:failed)
    assert Protocol.terminal?(:cancelled)
    refute Protocol.terminal?(:progress)
    assert Enum.all?(Protocol.terminal_types(), &(&1 in Protocol.event_types()))
  end
end
