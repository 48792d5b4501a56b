"""The DNS stub: answers only names the policy allows, refuses and scores everything else."""
