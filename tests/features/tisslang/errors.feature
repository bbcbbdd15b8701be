Feature: Mistakes in a script are reported before anything runs
  Every syntax and semantic error is reported at once, each with its line and column,
  so that a script can be fixed in one pass. What only a run can tell (is there a knowledge
  base?) is reported when the run gets there, at the same kind of position, and TRY can catch it.

  Scenario Outline: A syntax error names its position
    Given the script:
      """
      #TISS!
      STEP "s" {
          <line>
      }
      """
    When I check it
    Then there is an error at line <l>, column <c> saying "<message>"

    Examples:
      | line                        | l | c  | message                          |
      | RUNN "x"                    | 3 | 5  | unknown keyword 'RUNN'           |
      | LOG "open                   | 3 | 9  | unterminated string              |
      | ASSERT LAST_RUN.CODE == 0   | 3 | 21 | unexpected 'CODE'                |
      | VAR = 3                     | 3 | 9  | unexpected '='                   |
      | LOG "\q"                    | 3 | 10 | unknown escape \q                |
      | SET_BUDGET MONEY = 2        | 3 | 16 | unknown budget MONEY             |
      | ELSE { LOG "x" }            | 3 | 5  | ELSE without IF                  |
      | TRY { RUN "x" }             | 3 | 5  | TRY without CATCH                |
      | STEP "inner" { LOG "x" }    | 3 | 5  | STEP inside a STEP               |
      | @mood "happy"               | 3 | 5  | unknown directive @mood          |
      | LOG "{{ghost}}"             | 3 | 5  | undefined variable 'ghost'       |
      | PARALLEL { LOG "x" }        | 3 | 16 | PARALLEL holds RUN commands      |
      | RETRIEVE "q" INTO c TOP 0   | 3 | 5  | RETRIEVE ... TOP wants 1 to 1000 |
      | RETRIEVE "{{ghost}}" INTO c | 3 | 5  | undefined variable 'ghost'       |

  Scenario Outline: A syntax error suggests the fix
    Given the script:
      """
      #TISS!
      RUN "true"
      <line>
      """
    When I check it
    Then there is an error at line 3, column <c> saying "<message>"

    Examples:
      | line                            | c  | message                                  |
      | RUNN "x"                        | 1  | unknown keyword 'RUNN' (did you mean RUN?) |
      | PROMPT_AGNET "x" INTO y         | 1  | did you mean PROMPT_AGENT?               |
      | IF LAST_RUN.EXIT_CODE = 0 THEN { | 23 | '=' does not compare: did you mean '=='? |
      | ASSERT LAST_RUN.STDOUT CONTAINS | 24 | CONTAINS needs a value on its right      |
      | ASSERT LAST_RUN.STDOUT MATCHES  | 24 | MATCHES needs a value on its right       |
      | ASSERT LAST_RUN.EXITCODE == 0   | 17 | did you mean EXIT_CODE?                  |

  Scenario: A block that is never closed points at its opening brace
    Given the script:
      """
      #TISS!
      STEP "open" {
          RUN "x"
      """
    When I check it
    Then there is an error at line 2, column 13 saying "never closed"

  Scenario: A heredoc that is never closed points at its start
    Given the script:
      """
      #TISS!
      WRITE "a.txt" <<EOF
      text
      """
    When I check it
    Then there is an error at line 2, column 15 saying "heredoc <<EOF is never closed"

  Scenario: Every error is reported, not just the first
    Given the script:
      """
      #TISS!
      RUNN "a"
      LOG "fine"
      ASSERT == 2
      LOG "bad \z"
      """
    When I check it
    Then there are 3 errors
    And there is an error at line 2, column 1 saying "unknown keyword 'RUNN'"
    And there is an error at line 4, column 8 saying "unexpected '=='"
    And there is an error at line 5, column 10 saying "unknown escape \z"

  Scenario: A script must start with the #TISS! line
    Given the script:
      """
      RUN "echo hi"
      """
    When I check it
    Then there is an error at line 1, column 1 saying "starts with the line `#TISS!`"

  Scenario: RETRIEVE without a knowledge base fails when it runs, at its position, and TRY catches it
    Given the script:
      """
      #TISS!
      TRY {
          RETRIEVE "how are slugs made" INTO context
      } CATCH {
          LOG "no context: {{LAST_ERROR}}"
      }
      STEP "ask" {
          RETRIEVE "how are slugs made" INTO context
      }
      """
    When I check it
    Then there are 0 errors
    When I run it
    Then it fails with "no knowledge base" at line 8, column 5
    And the output shows "no context: no knowledge base: RETRIEVE needs a knowledge base: pass --kb DIR"
