Feature: The TissLang language
  An agent is told what to do with a TissLang script: steps that write files, run commands in a
  sandbox, check the results and ask a model or a human. Each construct is shown here once.

  Scenario: TASK, SETUP and STEP group the work and show progress
    Given the script:
      """
      #TISS!
      TASK "Build a greeting"
      SETUP "workspace" {
          RUN "mkdir -p out"
      }
      STEP "greet" { RUN "echo hello > out/greeting.txt" }
      """
    When I run it
    Then it succeeds
    And the output shows "== TASK Build a greeting"
    And the output shows "-- STEP greet"
    And the file "out/greeting.txt" contains exactly:
      """
      hello
      """

  Scenario: A TASK with a block wraps the rest of the script
    Given the script:
      """
      #TISS!
      TASK "wrapped" {
          LOG "inside the task"
      }
      """
    When I run it
    Then it succeeds
    And the output shows "inside the task"

  Scenario: WRITE keeps a heredoc exactly, blank lines, indentation, quotes and braces included
    Given the script:
      """
      #TISS!
      VAR who = "world"
      WRITE "hello.py" <<PYTHON
      def greet():

          return "hello, {{who}} }"
      PYTHON
      WRITE "raw.txt" <<'EOF'
      {{who}} is not replaced here
      EOF
      """
    When I run it
    Then it succeeds
    And the file "hello.py" contains exactly:
      """
      def greet():

          return "hello, world }"
      """
    And the file "raw.txt" contains exactly:
      """
      {{who}} is not replaced here
      """

  Scenario: RUN, LAST_RUN and ASSERT: a failing command is data to check
    Given the script:
      """
      #TISS!
      RUN "echo out; echo err >&2; exit 3"
      ASSERT LAST_RUN.EXIT_CODE == 3
      ASSERT LAST_RUN.STDOUT CONTAINS "out" AND LAST_RUN.STDERR MATCHES "^err"
      ASSERT NOT LAST_RUN.TIMED_OUT AND LAST_RUN.DURATION < 5
      """
    When I run it
    Then it succeeds

  Scenario: A failed ASSERT stops the run and points at itself
    Given the script:
      """
      #TISS!
      RUN "exit 1"
      STEP "check" {
          ASSERT LAST_RUN.EXIT_CODE == 0
      }
      LOG "not reached"
      """
    When I run it
    Then it fails with "assertion failed" at line 4, column 5
    And the output does not show "not reached"

  Scenario: READ, VAR and interpolation
    Given the script:
      """
      #TISS!
      WRITE "name.txt" <<EOF
      Ada
      EOF
      READ "name.txt" AS raw
      VAR greeting = "Hi {{raw}}"
      LOG "{{greeting}}"
      ASSERT raw == "Ada\n" AND greeting CONTAINS "Ada"
      """
    When I run it
    Then it succeeds
    And the output shows "Hi Ada"

  Scenario: IF and ELSE choose a branch
    Given the script:
      """
      #TISS!
      RUN "test -f missing.txt"
      IF LAST_RUN.EXIT_CODE == 0 THEN {
          VAR state = "present"
      } ELSE {
          VAR state = "absent"
      }
      IF FILE "missing.txt" EXISTS OR state == "present" THEN { LOG "yes" }
      ELSE { LOG "no" }
      """
    When I run it
    Then it succeeds
    And the variable state is "absent"
    And the output shows "no"

  Scenario: TRY sends a failure to CATCH, which sees LAST_ERROR
    Given the script:
      """
      #TISS!
      TRY {
          READ "../outside.txt" AS secret
      } CATCH {
          LOG "recovered from: {{LAST_ERROR}}"
      }
      """
    When I run it
    Then it succeeds
    And the output shows "recovered from: refused"

  Scenario: PARALLEL runs its commands at the same time
    Given the script:
      """
      #TISS!
      PARALLEL {
          RUN "sleep 0.5; echo a > a.txt"
          RUN "sleep 0.5; echo b > b.txt"
          RUN "sleep 0.5; echo c > c.txt"
      }
      ASSERT FILE "a.txt" EXISTS AND FILE "b.txt" EXISTS AND FILE "c.txt" EXISTS
      """
    When I run it
    Then it succeeds
    And it took less than 1.4 seconds

  Scenario: CHOOSE lets the reviewer pick an option
    Given the script:
      """
      #TISS!
      CHOOSE {
          OPTION "fast" { VAR mode = "fast" }
          OPTION "safe" { VAR mode = "safe" }
      }
      """
    When I run it with the reviewer answering "2"
    Then it succeeds
    And the variable mode is "safe"

  Scenario: ESTIMATE_COST counts what a block would do and runs none of it
    Given the script:
      """
      #TISS!
      ESTIMATE_COST {
          RUN "touch should-not-exist"
          PROMPT_AGENT "Summarise the project" INTO summary
      }
      """
    When I run it
    Then it succeeds
    And the output shows "estimate: 1 commands, 0 file writes, 1 model calls"
    And the file "should-not-exist" does not exist

  Scenario: PROMPT_AGENT asks the model, with the persona directive, and stores the answer
    Given the script:
      """
      #TISS!
      @persona "a terse reviewer"
      PROMPT_AGENT "Rate this: {{thing}}" INTO verdict
      LOG "model says {{verdict}}"
      """
    When I run it with thing set to "code" and the model answering "fine"
    Then it succeeds
    And the output shows "model says fine"
    And the model was asked "Rate this: code"
    And the model's system message was "You are: a terse reviewer"

  Scenario: SET_BUDGET limits the model calls
    Given the script:
      """
      #TISS!
      SET_BUDGET API_CALLS = 1
      PROMPT_AGENT "one" INTO a
      PROMPT_AGENT "two" INTO b
      """
    When I run it with the model answering "ok"
    Then it fails with "budget exhausted" at line 4, column 1

  Scenario: PAUSE and REQUEST_REVIEW wait for a human, and a no stops the run even inside TRY
    Given the script:
      """
      #TISS!
      PAUSE "about to deploy"
      TRY {
          REQUEST_REVIEW "check the diff"
      } CATCH {
          LOG "this must not run"
      }
      """
    When I run it denying every review
    Then it fails with "denied" at line 2, column 1
    And the output shows "PAUSE: denied by --deny-all"

  Scenario: Comments and one-line blocks
    Given the script:
      """
      #TISS!
      # a whole-line comment
      STEP "one line" { LOG "a # inside a string is text" }   # a trailing comment
      """
    When I run it
    Then it succeeds
    And the output shows "a # inside a string is text"

  Scenario: A variable interpolated into RUN is one inert word
    Given the script:
      """
      #TISS!
      RUN "printf '%s' {{payload}}"
      ASSERT LAST_RUN.STDOUT == payload
      ASSERT NOT (FILE "pwned" EXISTS)
      """
    When I run it with payload set to "$(touch pwned); touch pwned"
    Then it succeeds

  Scenario: RETRIEVE puts the knowledge base's best chunks into a variable, the most relevant last
    Given the script:
      """
      #TISS!
      VAR thing = "title"
      RETRIEVE "turn a {{thing}} into a URL slug" INTO context TOP 2
      PROMPT_AGENT "{{context}}\nQuestion: how are slugs made?" INTO answer
      """
    When I run it with the knowledge base and the model answering "with hyphens"
    Then it succeeds
    And the output shows "retrieved 2 chunks for 'turn a title into a URL slug'"
    And the variable context ends with the chunk "slug.py:4-6 slug.slugify"
    And the model's prompt contains "# slug.py:4-6 slug.slugify\ndef slugify(title):"
    And the model's prompt contains "\nQuestion: how are slugs made?"
