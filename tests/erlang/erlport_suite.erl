%% The worker driven through ErlPort's own Erlang client (python:start/1, python:call/4,
%% python:cast/2, python:stop/1), as an ErlPort user's code would drive it.
%%
%% Run by tests/test_erlport.py on OTP 25 and OTP 28:
%%   erl -noshell -pa ERLPORT_EBIN -pa THIS_EBIN -run erlport_suite main WORKER TRAIN_JSON LONG_JSON GRPO_JSON
%% TRAIN_JSON is a short training job, LONG_JSON one long enough to be cancelled mid-run, GRPO_JSON
%% a GRPO job whose rewards this Erlang process computes (reward_request events, rewards/3 calls). Prints
%% "PASS name" or "FAIL name: reason" per case and "DONE passed/total"; halts 0 when all pass.
-module(erlport_suite).
-export([main/1]).

-define(EVENT_TIMEOUT, 300000).
-define(CALL_OPTS, [{timeout, 60000}]).

main([Worker, TrainFile, LongFile, GrpoFile]) ->
    {ok, Train} = file:read_file(TrainFile),
    {ok, Long} = file:read_file(LongFile),
    {ok, Grpo} = file:read_file(GrpoFile),
    {ok, P} = python:start([{python, Worker}, {start_timeout, 60000}]),
    Cases = [
        {ping, fun() -> pong = python:call(P, finetune_worker, ping, [], ?CALL_OPTS), ok end},
        {info_record_keys, fun() -> info_keys(P) end},
        {train_events_in_order, fun() -> train(P, Train) end},
        {cancel_by_call, fun() -> cancel(P, Long, call) end},
        {cancel_by_cast, fun() -> cancel(P, Long, cast) end},
        {grpo_rewards_from_erlang, fun() -> grpo(P, Grpo) end},
        {bad_config_then_alive, fun() -> bad_config(P) end},
        {undecodable_args_answered, fun() -> undecodable_args(P) end},
        {status_after_jobs, fun() -> statuses(P) end},
        {stop_leaves_no_process, fun() -> stop(P) end}
    ],
    Results = [run_case(Name, Fun) || {Name, Fun} <- Cases],
    Passed = length([ok || ok <- Results]),
    io:format("DONE ~p/~p on OTP ~s~n", [Passed, length(Cases), erlang:system_info(otp_release)]),
    halt(if Passed =:= length(Cases) -> 0; true -> 1 end).

run_case(Name, Fun) ->
    try Fun() of
        ok -> io:format("PASS ~p~n", [Name]), ok;
        Other -> io:format("FAIL ~p: returned ~0p~n", [Name, Other]), failed
    catch
        Class:Reason:Stack ->
            io:format("FAIL ~p: ~p:~0P ~0P~n", [Name, Class, Reason, 30, Stack, 12]),
            failed
    end.

%% ---- cases ------------------------------------------------------------------------------

info_keys(P) ->
    Info = python:call(P, finetune_worker, info, [], ?CALL_OPTS),
    #{protocol := 2, pid := Pid, uptime_s := Up, devices := [_ | _] = Devices} = Info,
    true = is_integer(Pid) andalso is_number(Up),
    [#{type := <<"cpu">>, cores := Cores}] = [D || D = #{type := <<"cpu">>} <- Devices],
    true = is_integer(Cores),
    all_atom_keys(Info).

train(P, Config) ->
    {ok, JobId} = python:call(P, finetune_worker, submit, [Config, self()], ?CALL_OPTS),
    Events = collect(JobId),
    Types = [T || {T, _} <- Events],
    [queued, started | _] = Types,
    completed = lists:last(Types),
    1 = length([T || T <- Types, lists:member(T, [completed, failed, cancelled])]),
    Steps = [S || {progress, #{step := S}} <- Events],
    true = length(Steps) >= 2 andalso Steps =:= lists:usort(Steps),
    [_ | _] = [L || {metrics, #{metrics := #{<<"loss">> := L}}} <- Events],
    [_ | _] = [C || {checkpoint, #{path := C}} <- Events],
    {completed, #{outputs := #{adapter_path := Adapter}, summary := #{final_perplexity := Ppl}}} =
        lists:last(Events),
    true = is_number(Ppl),
    true = filelib:is_regular(filename:join(binary_to_list(Adapter), "adapter_config.json")),
    ok.

cancel(P, Config, How) ->
    {ok, JobId} = python:call(P, finetune_worker, submit, [Config, self()], ?CALL_OPTS),
    wait_progress(JobId),
    case How of
        call -> ok = python:call(P, finetune_worker, cancel, [JobId], ?CALL_OPTS);
        cast -> ok = python:cast(P, {cancel, JobId})
    end,
    Events = collect(JobId),
    {cancelled, #{checkpoint := Checkpoint, step := Step}} = lists:last(Events),
    true = is_binary(Checkpoint) andalso Step >= 1,
    true = filelib:is_dir(binary_to_list(Checkpoint)),
    #{state := <<"cancelled">>} = python:call(P, finetune_worker, status, [JobId], ?CALL_OPTS),
    ok.

grpo(P, Config) ->
    {ok, JobId} = python:call(P, finetune_worker, submit, [Config, self()], ?CALL_OPTS),
    {Requests, Last} = score(P, JobId, 0),
    {completed, #{summary := #{steps := Steps}}} = Last,
    true = Requests >= Steps andalso Steps >= 1,
    {error, not_found} = python:call(P, finetune_worker, rewards, [JobId, 1, [0.0]], ?CALL_OPTS),
    ok.

%% Answer every reward request of JobId with the completions' lengths (an application's own
%% scoring); returns the number answered and the terminal event.
score(P, JobId, Answered) ->
    receive
        {fine_tuning, JobId, reward_request, #{request := Req, completions := Completions}} ->
            Scores = [byte_size(C) / 100 || C <- Completions],
            ok = python:call(P, finetune_worker, rewards, [JobId, Req, Scores], ?CALL_OPTS),
            score(P, JobId, Answered + 1);
        {fine_tuning, JobId, Type, Payload} when Type =:= completed; Type =:= failed; Type =:= cancelled ->
            {Answered, {Type, Payload}};
        {fine_tuning, JobId, _, _} ->
            score(P, JobId, Answered)
    after ?EVENT_TIMEOUT ->
        error({no_event_within, ?EVENT_TIMEOUT, JobId})
    end.

bad_config(P) ->
    {error, [_ | _] = Issues} =
        python:call(P, finetune_worker, submit, [<<"{\"job\": \"train\"}">>, self()], ?CALL_OPTS),
    true = lists:all(fun(#{path := Path, message := M}) -> is_binary(Path) andalso is_binary(M) end, Issues),
    Bad = #{<<"job">> => <<"train">>, <<"model_name">> => <<"/nonexistent-model">>,
            <<"output_dir">> => <<"/tmp/x">>, <<"dataset">> => #{<<"path">> => <<"/x.jsonl">>},
            <<"training_parameters">> => #{<<"learning_rate">> => -1}},
    {error, MapIssues} = python:call(P, finetune_worker, validate, [Bad], ?CALL_OPTS),
    [_] = [I || I = #{path := <<"training_parameters.learning_rate">>} <- MapIssues],
    pong = python:call(P, finetune_worker, ping, [], ?CALL_OPTS),
    ok.

%% Keys distinct in Erlang but equal in Python: the call must get an error reply, not silence.
undecodable_args(P) ->
    Bad = [#{a => 1, <<"a">> => 2}, #{1 => x, 1.0 => y}],
    [expect_protocol_error(P, Arg) || Arg <- Bad],
    pong = python:call(P, finetune_worker, ping, [], ?CALL_OPTS),
    ok.

expect_protocol_error(P, Arg) ->
    try python:call(P, finetune_worker, validate, [Arg], [{timeout, 10000}]) of
        Result -> error({expected_an_error_reply, Result})
    catch
        error:{python, 'finetune_worker.errors.ProtocolError', Message, _Trace} ->
            true = is_binary(Message) andalso byte_size(Message) > 0
    end.

statuses(P) ->
    [_ | _] = Jobs = python:call(P, finetune_worker, jobs, [], ?CALL_OPTS),
    lists:foreach(fun(#{metrics := Metrics, outputs := Outputs} = S) ->
                          ok = all_atom_keys(maps:without([metrics], S)),
                          true = lists:all(fun is_binary/1, maps:keys(Metrics)),
                          true = lists:all(fun is_atom/1, maps:keys(Outputs))
                  end, Jobs),
    ok.

stop(P) ->
    #{pid := OsPid} = python:call(P, finetune_worker, info, [], ?CALL_OPTS),
    true = os_alive(OsPid),
    ok = python:stop(P),
    wait_gone(OsPid, 15000).

%% ---- helpers ------------------------------------------------------------------------------

collect(JobId) ->
    receive
        {fine_tuning, JobId, Type, Payload} when is_atom(Type), is_map(Payload) ->
            case lists:member(Type, [completed, failed, cancelled]) of
                true -> [{Type, Payload}];
                false -> [{Type, Payload} | collect(JobId)]
            end
    after ?EVENT_TIMEOUT ->
        error({no_event_within, ?EVENT_TIMEOUT, JobId})
    end.

wait_progress(JobId) ->
    receive
        {fine_tuning, JobId, progress, #{step := S}} when S >= 1 -> ok;
        {fine_tuning, JobId, Type, P} when Type =:= completed; Type =:= failed; Type =:= cancelled ->
            error({ended_before_progress, Type, P});
        {fine_tuning, JobId, _, _} -> wait_progress(JobId)
    after ?EVENT_TIMEOUT ->
        error({no_progress_within, ?EVENT_TIMEOUT})
    end.

all_atom_keys(Map) when is_map(Map) ->
    case [K || K <- maps:keys(Map), not is_atom(K)] of
        [] -> ok;
        Bad -> error({binary_keys_in_a_record, Bad})
    end.

os_alive(OsPid) ->
    os:cmd("kill -0 " ++ integer_to_list(OsPid) ++ " 2>/dev/null && echo yes") =:= "yes\n".

wait_gone(OsPid, Ms) when Ms =< 0 ->
    error({still_running, OsPid});
wait_gone(OsPid, Ms) ->
    case os_alive(OsPid) of
        false -> ok;
        true -> timer:sleep(100), wait_gone(OsPid, Ms - 100)
    end.
