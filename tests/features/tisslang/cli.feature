Feature: The tisslm tiss command line
  `check` parses and checks, `plan` shows what would run, `run` runs it in the sandbox.
  Exit status: 0 success, 1 a failure or refusal, 2 a usage or syntax error.

  Background:
    Given the script file "job.tiss":
      """
      #TISS!
      STEP "greet" {
          RUN "echo hello {{who}}"
          ASSERT LAST_RUN.STDOUT CONTAINS "hello"
          WRITE "note.txt" <<EOF
      greeted {{who}}
      EOF
      }
      RUN "curl https://example.com"
      """

  Scenario: check accepts a good script
    When I run `tiss check job.tiss --var who=x`
    Then the exit status is 0
    And stdout shows "job.tiss: ok"

  Scenario: check reports every error with the source line and a caret, exit 2
    Given the script file "bad.tiss":
      """
      #TISS!
      RUNN "a"
      LOG "bad \q"
      """
    When I run `tiss check bad.tiss`
    Then the exit status is 2
    And stderr shows:
      """
      bad.tiss:2:1: unknown keyword 'RUNN' (did you mean RUN?)
          RUNN "a"
          ^
      bad.tiss:3:10: unknown escape \q (use \", \\, \n or \t)
          LOG "bad \q"
                   ^
      2 errors in bad.tiss
      """

  Scenario: plan lists the steps in order and flags the risky ones
    When I run `tiss plan job.tiss --var who=x`
    Then the exit status is 0
    And stdout shows "job.tiss:3:5  Run echo hello {{who}}"
    And stdout shows "! needs the network, which the sandbox does not have"

  Scenario: plan --json gives the steps and the AST
    When I run `tiss plan job.tiss --json --var who=x`
    Then the exit status is 0
    And stdout is JSON whose step 4 is a "Write" at "job.tiss:5:5"

  Scenario: run executes the script in the sandbox and keeps an audit log
    When I run `tiss run job.tiss --workspace {workspace} --var who=ada --audit {audit}`
    Then the exit status is 0
    And stdout shows "hello ada"
    And the workspace file "note.txt" contains "greeted ada"
    And the audit log shows 2 commands run in the "bwrap" sandbox and ends "ok"

  Scenario: a failed assertion exits 1 with its position
    Given the script file "fail.tiss":
      """
      #TISS!
      RUN "exit 2"
      ASSERT LAST_RUN.EXIT_CODE == 0
      """
    When I run `tiss run fail.tiss --workspace {workspace} --audit {audit}`
    Then the exit status is 1
    And stderr shows "fail.tiss:3:1: assertion failed: LAST_RUN.EXIT_CODE == 0"

  Scenario: --var wins over the script's own VAR, and check, plan and run warn about it
    Given the script file "expect.tiss":
      """
      #TISS!
      VAR expected = 3
      RUN "echo 3"
      LOG "expected {{expected}}, exit {{LAST_RUN.EXIT_CODE}}"
      ASSERT LAST_RUN.STDOUT CONTAINS "{{expected}}"
      """
    When I run `tiss check expect.tiss --var expected=4`
    Then the exit status is 0
    And stdout shows "expect.tiss: ok"
    And stderr shows "expect.tiss:2:1: warning: VAR expected is skipped: --var expected=... on the command line wins"
    When I run `tiss run expect.tiss --workspace {workspace} --var expected=4 --audit {audit}`
    Then the exit status is 1
    And stdout shows "expected 4, exit 0"
    And stderr shows "warning: VAR expected is skipped"
    And stderr shows "expect.tiss:5:1: assertion failed: LAST_RUN.STDOUT CONTAINS "4" (LAST_RUN.STDOUT was '3\n'"
    When I run `tiss run expect.tiss --workspace {workspace} --audit {audit}`
    Then the exit status is 0
    And stdout shows "expected 3, exit 0"

  Scenario: check warns about a placeholder it does not know, which would be printed as it is
    Given the script file "typo.tiss":
      """
      #TISS!
      RUN "true"
      LOG "exit {{LAST_RUN.EXITCODE}}"
      """
    When I run `tiss check typo.tiss`
    Then the exit status is 0
    And stderr shows "typo.tiss:3:1: warning: {{LAST_RUN.EXITCODE}} is not a field of LAST_RUN: did you mean {{LAST_RUN.EXIT_CODE}}?"

  Scenario: a security refusal exits 1
    Given the script file "escape.tiss":
      """
      #TISS!
      WRITE "../escaped.txt" <<EOF
      x
      EOF
      """
    When I run `tiss run escape.tiss --workspace {workspace} --audit {audit}`
    Then the exit status is 1
    And stderr shows "escape.tiss:2:1: refused"

  Scenario: usage errors exit 2
    When I run `tiss run job.tiss --workspace {workspace} --approve-all --deny-all`
    Then the exit status is 2
    And stderr shows "not both"

  Scenario: an unknown sandbox is a usage error, and none must be asked for by name
    When I run `tiss run job.tiss --workspace {workspace} --sandbox chroot --var who=x`
    Then the exit status is 2
    And stderr shows "expected bwrap or none"

  Scenario: a review without a terminal or a flag stops the run
    Given the script file "review.tiss":
      """
      #TISS!
      PAUSE "check me"
      """
    When I run `tiss run review.tiss --workspace {workspace} --audit {audit}`
    Then the exit status is 1
    And stderr shows "needs a reviewer"

  Scenario: run --kb gives RETRIEVE a knowledge base, plan flags it, and without --kb it fails at its line
    Given the script file "ask.tiss":
      """
      #TISS!
      RETRIEVE "turn a title into a URL slug" INTO context TOP 2
      LOG "{{context}}"
      """
    When I run `tiss plan ask.tiss`
    Then the exit status is 0
    And stdout shows "ask.tiss:2:1  Retrieve 'turn a title into a URL slug' -> context (top 2)"
    And stdout shows "! reads the knowledge base (needs --kb DIR)"
    When I run `tiss run ask.tiss --workspace {workspace} --kb {kb} --audit {audit}`
    Then the exit status is 0
    And stdout shows "# slug.py:4-6 slug.slugify"
    And the audit log records the retrieval of "turn a title into a URL slug" with 2 hits
    When I run `tiss run ask.tiss --workspace {workspace} --audit {audit}`
    Then the exit status is 1
    And stderr shows "ask.tiss:2:1: no knowledge base: RETRIEVE needs a knowledge base: pass --kb DIR"
    When I run `tiss run ask.tiss --workspace {workspace} --kb missing-kb`
    Then the exit status is 2
    And stderr shows "missing-kb/index.sqlite: no knowledge base here"
