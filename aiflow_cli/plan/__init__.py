"""The partition + codec solver (`aiflow plan`).

``solve(profiles, links, objective=..., limits=...) -> Plan`` places the model's stages on the tiers and picks a
codec per cut; ``load_plan(path)`` reads a saved plan for the runtime. problem.py flattens the inputs, cost.py is
the latency model, solver.py the exact DP, brute.py its reference, explain.py / sweep.py / plot.py the reports.
"""

from aiflow_cli.plan.problem import Limits, Problem, build_problem
from aiflow_cli.plan.schema import Plan, load_plan, save_plan
from aiflow_cli.plan.solver import solve, solve_problem

__all__ = ["Limits", "Plan", "Problem", "build_problem", "load_plan", "save_plan", "solve", "solve_problem"]
