"""`dxagent chat`: an interactive consultation on a case. Research use only.

A chat thread is one run in the trace store and one LangGraph thread (same id). Opening it loads the image(s)
(the intake node). Each question is a turn: the graph restarts from its first node with the new question, the
budget for one turn and the earlier turns (question, answer) in the planner's prompt; the evidence of all turns
stays in the state, so later answers can cite it. Every completed node is checkpointed, so a thread resumes
(`--resume THREAD_ID`) where it stopped, and Ctrl-C during a turn stops it before its next step with nothing
lost; a model call under way (a silent endpoint) is abandoned at once, a tool under way finishes. The trace records
each turn (a `turn` note, then the usual events) and is re-sealed after each answer.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markdown import Markdown

from agent.core.state import Budget, CaseInput, CaseState, Turn
from agent.core.untrusted import clean_inputs
from agent.engine import calibration
from agent.engine.graph import TurnCancelled, new_run_id, stored_inputs
from agent.engine.llm_calls import CallCancelled, cancellable
from agent.engine.planner import evidence_line, prompt_versions
from agent.engine.report import to_markdown
from agent.engine.session import DxError, Engine, inputs_sha256, resolve_inputs
from agent.store.trace import RunBusy

HELP = """commands:
  /tools            the tools that apply to this case
  /evidence ID      one evidence item: inputs, output, artifact files (e.g. /evidence E2)
  /report           the current structured report
  /trace            the trace id (= thread id) and its step count
  /image PATH       add another image (e.g. a prior study of the same patient) as a new view
  /save PATH        write the conversation and the report (Markdown; .json for JSON)
  /quit             leave (Ctrl-D too); the thread can be resumed with --resume
anything else is a question about the case."""


def answer_text(report: dict[str, Any], narrative: bool) -> str:
    """What the assistant says: the model-written impression on an endpoint (every sentence cites evidence),
    else the answer assembled from the evidence."""
    if narrative:
        return report.get("impression") or ""
    a = report.get("answer")
    return (a.get("text") or "") if isinstance(a, dict) else str(a or "")


class Chat:
    def __init__(self, eng: Engine, out: Console, per_turn_steps: int = 4, max_wall_s: float = 300.0,
                 route: bool = True):
        self.eng, self.out = eng, out
        self.per_turn_steps, self.max_wall_s, self.route = per_turn_steps, max_wall_s, route
        self.thread_id = ""
        self.cancel = threading.Event()
        eng.rt.cancel = self.cancel
        eng.rt.on_step = self._on_step
        self._pool = ThreadPoolExecutor(max_workers=1)

    # -- thread --------------------------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return {"configurable": {"thread_id": self.thread_id}, "recursion_limit": 1000}

    def state(self) -> CaseState:
        snap = self.eng.graph.get_state(self.config)
        return CaseState.model_validate(snap.values)

    def open(self, paths: list[str], modality: str | None = None, body_part: str | None = None,
             clinical_context: str = "") -> None:
        """Start a thread: load the images (intake), record the run."""
        paths = resolve_inputs(paths)
        digest = inputs_sha256(paths)
        _, clinical_context, removed = clean_inputs("", clinical_context)
        self.thread_id = self.eng.rt.run_id = new_run_id(digest)
        self.eng.rt.input_paths[self.thread_id] = [str(p) for p in paths]
        planner = self.eng.rt.planner
        state = CaseState(case_id=digest[:12], run_id=self.thread_id, question="(chat)",
                          inputs=CaseInput(paths=stored_inputs(paths), modality=modality, body_part=body_part),
                          clinical_context=clinical_context,
                          notes=removed,
                          budget=Budget(max_steps=self.per_turn_steps, max_wall_s=self.max_wall_s, route=self.route))
        self.eng.trace.start_run(self.thread_id, state.case_id, "(chat)", planner.model_id, planner.mode, digest,
                                 {"prompts": prompt_versions(), "tools": {n: t.version for n, t in self.eng.rt.tools.items()}},
                                 settings={"llm": self.eng.llm, "chat": True, "max_steps": self.per_turn_steps,
                                           "max_wall_s": self.max_wall_s, "modality": modality, "body_part": body_part,
                                           "clinical_context": clinical_context, "route": self.route,
                                           "min_probability": calibration.min_probability(),
                                           "min_probability_new_wording": calibration.min_probability(True)})
        self.eng.invoke(state, self.config, interrupt_after=["intake"])
        self.eng.trace.finish_run(self.thread_id, "idle")  # sealed while it waits for a question

    def resume(self, thread_id: str) -> CaseState:
        self.thread_id = self.eng.rt.run_id = thread_id
        if self.eng.trace.get_run(thread_id) is None or not self.eng.graph.get_state(self.config).values:
            raise DxError(f"no chat thread {thread_id!r} in {self.eng.trace.shown_url}")
        st = self.state()
        if not st.views:
            raise DxError(f"thread {thread_id} has no loaded image to talk about")
        return st

    # -- one turn ------------------------------------------------------------------------------------------------
    def ask(self, question: str) -> dict[str, Any] | None:
        """Run one turn; returns its report, or None when the user cancelled it (Ctrl-C)."""
        st = self.state()
        conv = list(st.conversation)
        if st.report is not None and st.question != "(chat)":  # the previous turn finished: it joins the conversation
            conv.append(self._turn_of(st, len(conv) + 1))
        n = len(conv) + 1
        rt = self.eng.rt
        rt.now = time.time()
        try:
            self.eng.trace.reopen(self.thread_id)  # the thread's one writer for this turn
        except RunBusy as exc:
            raise DxError(str(exc)) from None
        question, _, removed = clean_inputs(question, "")
        rt.record("note", "turn", "turn", {"turn": n, "question": question})
        update = {"question": question, "conversation": conv, "notes": list(dict.fromkeys(st.notes + removed)),
                  "report": None, "critiques": [], "pending": None, "answer": None,
                  "planner_failures": 0, "budget": Budget(max_steps=st.tool_steps + self.per_turn_steps,
                                                          max_wall_s=self.max_wall_s, started_at=time.time(),
                                                          route=self.route)}
        self.cancel.clear()
        fut = self._pool.submit(self._invoke, update)
        try:
            while True:
                try:
                    return fut.result(timeout=0.1).report
                except FutureTimeout:
                    continue
        except (TurnCancelled, CallCancelled):
            return self._cancelled(None)
        except KeyboardInterrupt:
            return self._cancelled(fut)

    def _invoke(self, update: dict[str, Any]) -> CaseState:
        with cancellable(self.cancel):  # Ctrl-C abandons an endpoint call under way (llm_calls.within)
            return self.eng.invoke(update, self.config)

    def _cancelled(self, fut: Any) -> None:
        self.cancel.set()
        if fut is not None:
            self.out.print("[yellow]cancelling this turn[/]: a model call under way is abandoned, a tool under way "
                           "finishes and is kept …", highlight=False, soft_wrap=True)
            while not fut.done():
                try:
                    fut.exception(timeout=0.2)
                except FutureTimeout:
                    continue
                except KeyboardInterrupt:
                    self.out.print("still waiting for the step under way (tools have time limits) …")
        self.cancel.clear()
        st = self.state()
        self.eng.rt.now = time.time()
        self.eng.rt.record("note", "turn", "cancelled", {"evidence": [e.id for e in st.evidence]})
        self.eng.trace.finish_run(self.thread_id, "cancelled")
        self.out.print(f"turn cancelled; the evidence so far ({', '.join(e.id for e in st.evidence) or 'none'}) "
                       "is kept. Ask again or /quit.", highlight=False, soft_wrap=True)
        return None

    def _turn_of(self, st: CaseState, n: int) -> Turn:
        rep = st.report or {}
        text = answer_text(rep, self.narrative)
        ids = sorted(set(re.findall(r"\bE\d+\b", text)), key=lambda i: int(i[1:]))  # what the answer cites
        return Turn(turn=n, question=st.question, answer=text,
                    outcome=rep.get("recommendation", {}).get("outcome", ""), evidence_ids=ids)

    @property
    def narrative(self) -> bool:
        return self.eng.rt.narrative_llm is not None

    def _on_step(self, node: str, update: dict[str, Any]) -> None:
        o = self.out
        if node == "think" and update.get("pending") is not None and update["pending"].action == "call":
            d = update["pending"]
            args = ", ".join(f"{k}={json.dumps(v)}" for k, v in d.args.items() if v is not None)
            o.print(f"  [cyan]think[/]   → {d.tool}({args})", highlight=False, soft_wrap=True)
        elif node == "think":
            o.print("  [cyan]think[/]   → answer", highlight=False)
        elif node == "act" and update.get("evidence"):
            e = update["evidence"][-1]
            line = evidence_line(e, self.eng.rt.tools)["summary"]
            o.print(f"  [magenta]act[/]     [{e.id}] {e.tool} {e.status}: {line[:160]}", highlight=False, soft_wrap=True)
        elif node == "rethink" and update.get("critiques"):
            c = update["critiques"][-1]
            o.print(f"  [blue]rethink[/] {c.route}: {c.why}", highlight=False, soft_wrap=True)

    def show_answer(self, report: dict[str, Any]) -> None:
        o = self.out
        o.print(f"[bold green]dxagent[/]: {answer_text(report, self.narrative)}", highlight=False, soft_wrap=True)
        rec = report.get("recommendation", {})
        o.print(f"  outcome: {rec.get('outcome')} — {rec.get('text')}", highlight=False, soft_wrap=True)
        for d in report.get("dropped_claims", []):
            o.print(f"  [red]flagged[/] {d}", highlight=False, soft_wrap=True)

    # -- slash commands ------------------------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Handle a /command; False means quit."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        o = self.out
        st = self.state()
        if cmd in ("/quit", "/exit", "/q"):
            return False
        if cmd == "/help":
            o.print(HELP, highlight=False)
        elif cmd == "/tools":
            for name in st.applicable_tools:
                o.print(f"  {name:<24} {self.eng.rt.tools[name].description}", highlight=False, soft_wrap=True)
        elif cmd == "/evidence":
            e = st.evidence_by_id(arg.upper())
            if e is None:
                o.print(f"no evidence {arg!r}; there are {', '.join(x.id for x in st.evidence) or 'none yet'}")
            else:
                o.print(f"[{e.id}] {e.tool} {e.status} (step {e.step}, {e.duration_s:.2f} s)", highlight=False)
                o.print(f"  args: {json.dumps(e.args)}", highlight=False, soft_wrap=True)
                o.print(f"  summary: {evidence_line(e, self.eng.rt.tools)['summary']}", highlight=False, soft_wrap=True)
                if e.error:
                    o.print(f"  error: {e.error}", highlight=False, soft_wrap=True)
                if e.output is not None:
                    o.print("  output: " + json.dumps(e.output, indent=1)[:3000], highlight=False, soft_wrap=True)
                for a in e.artifacts:
                    o.print(f"  artifact {a.kind}: {self.eng.rt.store.path(a)}  {a.description}", highlight=False,
                            soft_wrap=True)
        elif cmd == "/report":
            o.print(Markdown(to_markdown(st.report)) if st.report else "no report yet: ask a question first")
        elif cmd == "/trace":
            n = len(self.eng.trace.events(self.thread_id))
            o.print(f"trace {self.thread_id}: {n} events, {len(st.steps)} steps, {len(st.evidence)} evidence item(s); "
                    f"dxagent trace show {self.thread_id}", highlight=False, soft_wrap=True)
        elif cmd == "/image":
            self._add_image(st, arg)
        elif cmd == "/save":
            self._save(st, arg)
        else:
            o.print(f"unknown command {cmd}; /help lists them", highlight=False)
        return True

    def _add_image(self, st: CaseState, arg: str) -> None:
        from agent.imaging.loaders import ImageLoadError
        from agent.imaging.views import load_views

        if not arg:
            self.out.print("usage: /image PATH")
            return
        try:
            view = load_views([arg], self.eng.rt.store)[0]
        except (ImageLoadError, OSError) as exc:
            self.out.print(f"[red]cannot add {Path(arg).name}[/]: {exc}", highlight=False)
            return
        vid = f"V{len(st.views) + 1}"
        view = view.model_copy(update={"id": vid, "provenance": {"added": "chat", "role": "comparison image"}})
        self.eng.rt.keep_artifacts([view.pixels])
        self.eng.rt.now = time.time()
        self.eng.rt.record("note", "image", "image", {"view": view.model_dump(mode="json")})
        self.eng.trace.reseal(self.thread_id)
        self.eng.graph.update_state(self.config, {"views": st.views + [view]}, as_node="intake")
        self.out.print(f"added {vid}: {view.modality} {view.ndim_spatial}D {list(view.shape)}"
                       + ("" if view.modality == st.views[0].modality else
                          f" (note: V1 is {st.views[0].modality})"), highlight=False)

    def _save(self, st: CaseState, arg: str) -> None:
        if not arg:
            self.out.print("usage: /save PATH (Markdown, or .json)")
            return
        path = Path(arg).expanduser()
        turns = list(st.conversation)
        if st.report is not None and st.question != "(chat)":
            turns.append(self._turn_of(st, len(turns) + 1))
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            path.write_text(json.dumps({"thread_id": self.thread_id, "turns": [t.model_dump() for t in turns],
                                        "report": st.report}, indent=2))
        else:
            lines = [f"# dxagent chat {self.thread_id}", "", "RESEARCH USE ONLY.", ""]
            for t in turns:
                lines += [f"**Q{t.turn}:** {t.question}", "", f"**A{t.turn}:** {t.answer} ({t.outcome})", ""]
            lines += ["---", "", to_markdown(st.report) if st.report else "(no report yet)"]
            path.write_text("\n".join(lines) + "\n")
        self.out.print(f"saved {path}", highlight=False)


def loop(chat: Chat, first_question: str | None = None) -> None:
    """The terminal conversation: read a line, run a turn or a command, until /quit or EOF."""
    o = chat.out
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C must cancel a turn even when this process inherited SIGINT as ignored (Python then installs no
        # handler): a shell's background job, or a parent that ignores it - the test suite's, after a test had
        # started a local Ray instance, made ^C do nothing until the tool's time limit
        signal.signal(signal.SIGINT, signal.default_int_handler)
    o.print(f"dxagent chat — thread {chat.thread_id} — RESEARCH USE ONLY, not a medical device. /help for commands.",
            highlight=False, soft_wrap=True)
    pending = first_question
    while True:
        if pending is None:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            except KeyboardInterrupt:
                o.print("\n(Ctrl-C cancels a running turn; /quit or Ctrl-D leaves)")
                continue
        else:
            line, pending = pending, None
            o.print(f"you> {line}", highlight=False)
        if not line:
            continue
        if line.startswith("/"):
            if not chat.command(line):
                break
            continue
        try:
            report = chat.ask(line)
        except Exception as exc:  # recorded in the trace as a failed turn; the thread and its evidence stay
            o.print(f"[red]error:[/] {exc if isinstance(exc, DxError) else f'{type(exc).__name__}: {exc}'}",
                    highlight=False, soft_wrap=True)
            continue
        if report is not None:
            chat.show_answer(report)
    o.print(f"\nbye. Resume this thread with: dxagent chat --resume {chat.thread_id}", highlight=False)
