"""Privilege separation shared by the supervisor and the workers.

``ids`` names the system users of each role and looks them up; ``privileges`` drops to
one of them and checks that the drop held.  Both the supervisor (spawn) and the workers
that switch users themselves (local delivery's children, the standalone sandbox)
import from here: a worker never imports ``eqmail.supervisor``.
"""
