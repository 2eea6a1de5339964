%% A plain Erlang client on a fresh node: declare the worker's atoms with one file:consult/1 of
%% docs/finetune_worker_atoms.eterm, then decode every frame of a training job (and the replies
%% to every call) with binary_to_term(Frame, [safe]).
%%
%% Run by tests/test_erlport.py:
%%   erl -noshell -pa THIS_EBIN -run safe_decode main WORKER ATOMS_FILE TRAIN_JSON
%% This module names no atom the worker sends (they would exist as soon as it loads, and the
%% "refused before the consult" check would prove nothing): tags are compared as strings.
%% Prints "RESULT key value" lines; halts 0.
-module(safe_decode).
-export([main/1]).

-define(TIMEOUT, 300000).

main([Worker, AtomsFile, TrainFile]) ->
    {ok, Train} = file:read_file(TrainFile),
    Port = open_port({spawn_executable, Worker},
                     [{args, ["port"]}, {packet, 4}, binary, exit_status, use_stdio]),
    call(Port, 1, info, []),
    First = next_frame(Port),
    Before = try binary_to_term(First, [safe]) of
                 _ -> decoded
             catch
                 error:badarg -> refused
             end,
    {ok, [Atoms]} = file:consult(AtomsFile),
    result(before_consult, Before),
    result(declared, length(Atoms)),
    call(Port, 2, submit, [Train, self()]),
    JobFrames = job_frames(Port, []),
    Calls = [
        {3, jobs, []},
        {4, validate, [<<"{\"job\": \"train\"}">>]},
        {5, submit, [<<"{\"job\": \"merge\"}">>, self()]},
        {6, cancel, [<<"no-such-job">>]},
        {7, ping, []},
        {8, no_such_function, []},
        {9, validate, [#{a => 1, <<"a">> => 2}]}
    ],
    [call(Port, Id, F, A) || {Id, F, A} <- Calls],
    ReplyFrames = [next_frame(Port) || _ <- Calls],
    Frames = [First | JobFrames ++ ReplyFrames],
    Decoded = [{F, try {ok, binary_to_term(F, [safe])} catch error:badarg -> error end} || F <- Frames],
    Failures = [F || {F, error} <- Decoded],
    result(frames, length(Frames)),
    result(failures, length(Failures)),
    [result(failed_frame_head, binary:part(F, 0, min(64, byte_size(F)))) || F <- lists:sublist(Failures, 3)],
    Types = lists:usort([atom_to_list(element(3, Ev)) || {_, {ok, {Tag, _, Ev}}} <- Decoded,
                                                        atom_to_list(Tag) =:= "M"]),
    result(event_types, Types),
    Replies = [atom_to_list(element(1, T)) || {_, {ok, T}} <- Decoded, tuple_size(T) =:= 3,
                                              atom_to_list(element(1, T)) =/= "M"],
    result(reply_tags, lists:usort(Replies)),
    port_close(Port),
    halt(0).

call(Port, Id, Function, Args) ->
    true = port_command(Port, term_to_binary({'C', Id, finetune_worker, Function, Args})).

next_frame(Port) ->
    receive
        {Port, {data, Frame}} -> Frame;
        {Port, {exit_status, S}} -> error({worker_exited, S})
    after ?TIMEOUT -> error(no_frame)
    end.

%% Frames until the job's terminal event; only the tag of the event is looked at (as text).
job_frames(Port, Acc) ->
    Frame = next_frame(Port),
    Acc2 = [Frame | Acc],
    case terminal(Frame) of
        true -> lists:reverse(Acc2);
        false -> job_frames(Port, Acc2)
    end.

terminal(Frame) ->
    case binary_to_term(Frame, [safe]) of
        {_M, _Pid, {_, _, Type, _}} -> lists:member(atom_to_list(Type), ["completed", "failed", "cancelled"]);
        _ -> false
    end.

result(Key, Value) ->
    io:format("RESULT ~p ~0p~n", [Key, Value]).
